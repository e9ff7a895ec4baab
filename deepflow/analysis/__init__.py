"""Model analysis: feature attributions (explainability) and group fairness metrics.

``attributions`` and ``fairness`` are pure functions of arrays; ``plots`` (matplotlib) is loaded
only when ``save_attribution_grid`` is first used, so importing deepflow stays light.
"""
from deepflow.analysis.attributions import (METHODS, attribute, gradient_x_input,
                                            integrated_gradients, method_options, occlusion,
                                            saliency, smoothgrad)
from deepflow.analysis.fairness import group_metrics, reweighing_weights


def __getattr__(name: str):
  if name == "save_attribution_grid":
    from deepflow.analysis.plots import save_attribution_grid
    return save_attribution_grid
  raise AttributeError(f"module 'deepflow.analysis' has no attribute {name!r}")


__all__ = ["METHODS", "attribute", "gradient_x_input", "group_metrics", "integrated_gradients",
           "method_options", "occlusion", "reweighing_weights", "saliency",
           "save_attribution_grid", "smoothgrad"]
