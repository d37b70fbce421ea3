"""Baton's cluster layer: configuration, the Redis registry and prefix index,
the controller actor that owns the worker pools, the launcher and the `baton` CLI.

Module map (each has one job):
  config.py         ClusterConfig: one frozen section per component, YAML + overrides, validated
  keys.py           every Redis key pattern
  store.py          connect(url): redis:// or memory:// (the in-process store) clients
  memory_store.py   the in-process store: Redis's commands we use, in a dict (or a Ray actor)
  redis_server.py   a private redis-server for `baton up` and tests
  registry.py       WorkerInfo, Registry (register / heartbeat / drain flag / deregister / list_live)
  prefix_index.py   PrefixIndexWriter: block events → the index, one pipeline per step, self-healing
  types.py          WorkerSpec, WorkerState (plain data between controller, workers and CLI)
  ray_errors.py     remote_cause / reason: the error another actor raised, without Ray's wrapping
  worker_actor.py   ManagedWorker: workers.WorkerHost + registration and heartbeats, as a Ray actor
  controller.py     the `baton-controller` actor: pools, restarts, scale, drain, state
  router_actor.py   the router (router.server.build_router) inside a Ray actor
  launcher.py       launch(config) → ClusterHandle; shutdown()
  cli.py            `baton up | status | scale | drain | down | generate | bench`
  state_file.py     the state file `baton up` writes for the other commands
  status_view.py    `baton status` output: worker table, router health, registry fallback
  generate.py       `baton generate`: one in-process engine, streamed to stdout

Leaf modules (config, keys, store, memory_store, registry, prefix_index, types, ray_errors)
import neither Ray nor the workers, so the router and workers may use them.
"""
