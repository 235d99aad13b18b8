"""Reference dynamic-k routers, one readable file per framework."""
