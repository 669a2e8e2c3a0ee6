"""Thin adapters from frameworks to `vpcce.linear_cross_entropy`; each module imports its framework,
so import the one you use (``vpcce.integrations.megatron`` needs megatron-core)."""
