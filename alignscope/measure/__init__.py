"""Per-image distances and their running statistics (:mod:`.metrics`), and the model's prediction
under each transform (:mod:`.prediction`). Statistics are update / merge / compute objects in float64."""
