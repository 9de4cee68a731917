"""Deep tasks: a durable scheduler placing long-running agents on labelled nodes."""
