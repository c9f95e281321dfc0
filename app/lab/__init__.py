"""The routing lab: trace generators, a simulator of vLLM replicas, peers' rules, the oracle."""
