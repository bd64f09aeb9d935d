"""Simulated system heterogeneity: device tiers, links, stragglers, deadlines, dropouts.

Its one home: :mod:`fedvision.system.model` is the heterogeneity model (plain Python and numpy,
no Flower), :mod:`fedvision.system.round` its hook into the round loop (``SystemRound``, a
:class:`fedvision.fl.feature.Feature`); the config group is ``conf/system/``.
"""
