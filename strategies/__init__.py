"""Aggregation rules Flower 1.39's Message API lacks: SCAFFOLD, FedNova, and seeded sampling."""
