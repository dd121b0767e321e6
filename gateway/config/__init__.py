"""routes.yaml: the model (frozen dataclasses), its loader (file:line errors), and
what `gateway check` says about it."""
