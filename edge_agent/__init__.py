"""The edgeloop device SDK (`EdgeAgent`). Not built yet: see the project's open issues."""

__all__: list[str] = []
