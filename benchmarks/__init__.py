"""The harness behind docs/benchmarks/ (not packaged; run from the repository root).

- `overhead`: the request path's cost on a zero-compute backend, side by side with peers.
- `engines`: the real CPU engine: bare vLLM, stock Ray Serve LLM and this stack.
- `startup`: cold and warm start to the first answer.
- `peer_bench`: real peer routers and the Ray fronts over HTTP, in front of `sim_server`.
- `decision_cost`, `decision_cost_ab`: the cost of one routing decision (and before/after).
- `lab_fingerprint`: a digest of every decision of the lab's reference replays.
- `sim_server`: the lab's replica simulator behind OpenAI-shaped HTTP (a simulator, not an engine).
- `http_router`: a policy of `app.routing` in a tiny HTTP router (for the peer benchmark).
- `ray_fronts`: our stack and stock Ray Serve LLM in front of `sim_server` replicas.
- `simulated_engine`: the simulated engine deployment for load, fault and overhead runs.
- `processes`: ports, readiness and stopping of the processes the benchmarks start.
"""
