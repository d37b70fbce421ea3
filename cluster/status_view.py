"""What `baton status` (and `scale`/`drain`) print: the rich worker table, the
router's health line, and a controller-less state read from the registry."""

from __future__ import annotations


def console():
    """A rich console; when output is not a terminal, wide enough that tables are not cut."""
    from rich.console import Console

    c = Console()
    if not c.is_terminal:
        c = Console(width=max(c.width, 140))
    return c


def _hit_rate(stats: dict) -> str:
    q = stats.get("prefix_cache_queries") or 0
    return f"{100.0 * (stats.get('prefix_cache_hits') or 0) / q:.1f}%" if q else "-"


def render_status(state: dict, extra: dict | None = None):
    from rich.table import Table

    extra = extra or {}
    title = f"Baton — {state.get('model', '?')}"
    if extra.get("http_url"):
        title += f" — {extra['http_url']}/v1"
    t = Table(title=title, caption=f"store {state.get('store_url', '?')}  pools " +
              ", ".join(f"{r}={n}" for r, n in state.get("targets", {}).items()))
    for col, just in (("worker", "left"), ("role", "left"), ("status", "left"), ("address", "left"),
                      ("running", "right"), ("waiting", "right"), ("held", "right"), ("KV usage", "right"),
                      ("cache hit", "right"), ("restarts", "right")):
        t.add_column(col, justify=just)
    colors = {"ready": "green", "starting": "yellow", "draining": "yellow", "dead": "red"}
    for w in state.get("workers", []):
        s = w.get("stats") or {}
        role = w["role"] + (f" TP={w['tp']}" if w.get("tp", 1) > 1 else "")
        t.add_row(w["worker_id"], role, f"[{colors.get(w['status'], 'white')}]{w['status']}[/]",
                  w.get("address", ""), str(s.get("num_running", "-")), str(s.get("num_waiting", "-")),
                  str(s.get("num_held", "-")),
                  f"{100.0 * s['kv_cache_usage']:.1f}%" if "kv_cache_usage" in s else "-",
                  _hit_rate(s), str(w.get("restarts", 0)))
    return t


def state_from_registry(store_url: str, namespace: str) -> dict:
    """A ``Controller.state()``-shaped dict built from the registry alone (controller unreachable)."""
    from collections import Counter

    from cluster.registry import Registry
    from cluster.store import connect

    records = Registry(connect(store_url), namespace).snapshot()
    workers = [{"worker_id": r.info.worker_id, "role": r.info.role, "address": r.info.address,
                "status": ("draining" if r.info.draining else "ready") if r.alive else "dead",
                "restarts": 0, "stats": r.stats} for r in records]
    targets = dict(Counter(w["role"] for w in workers))
    model = records[0].info.model if records else "?"
    return {"model": model, "store_url": store_url, "targets": targets, "workers": workers}


def router_health(http_url: str) -> str:
    import httpx

    try:
        body = httpx.get(http_url + "/health", timeout=2.0).json()
    except Exception as e:
        return f"[red]unreachable[/red] ({type(e).__name__})"
    color = {"ok": "green", "degraded": "yellow"}.get(body.get("status"), "red")
    return (f"[{color}]{body.get('status')}[/{color}]  prefix index {body.get('prefix_index', '?')}, "
            f"registry {body.get('registry', '?')}, running {body.get('num_requests_running', '?')}, "
            f"queued {body.get('num_requests_waiting', '?')}")
