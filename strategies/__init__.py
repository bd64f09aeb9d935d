"""Aggregation rules that Flower lacks or gets wrong (none yet: FedAvg/FedProx come from Flower)."""
