"""Placement: tensor-parallel size -> Ray placement-group bundles, strategy and resource checks.

Pure Python; touches no tensors. See `placement.bundles` for the bundle layout.
"""

from placement.bundles import bundles_for, serve_deployment_options, strategy_for, workers_in_process
from placement.resources import PlacementError, check_resources, placement_problem

__all__ = ["bundles_for", "strategy_for", "serve_deployment_options", "check_resources",
           "placement_problem", "PlacementError", "workers_in_process"]
