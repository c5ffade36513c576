"""Core: types, interfaces, plans and budgets, the registry.  Imports neither strategies nor adapters
(the registry loads them lazily through pluggy, like any plugin)."""
