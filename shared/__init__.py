"""Domain-free helpers: never import TensorFlow Federated from here."""
