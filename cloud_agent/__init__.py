"""The edgeloop cloud agent service. Not built yet: see the project's open issues."""

__all__: list[str] = []
