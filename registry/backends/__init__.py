"""Where registrations live: the RegistryBackend interface and its memory backend
(lease timer, long-poll wake-ups, snapshot file, worker feed)."""
