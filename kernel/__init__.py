"""The ground floor: settings, the error hierarchy, and the Postgres and Redis connection
helpers. It imports nothing of the project."""
