"""State that outlives a request: stored responses, conversations, sessions, rate counters."""
