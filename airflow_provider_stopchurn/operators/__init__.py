"""The provider's operators, one module per operator; ``stopchurn`` re-exports them at the path DAGs import."""
