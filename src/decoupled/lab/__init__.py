"""The lab: tasks, a training runner, a SQLite results store, compare and sweep."""
