"""The local stack (Kafka from Maven jars, Postgres, Redis on loopback) and the process-
group helper every launcher of processes uses."""
