"""Transport: how events travel (Avro codec, Kafka clients, topics, reading a topic, the
Faust app settings); no business rules."""
