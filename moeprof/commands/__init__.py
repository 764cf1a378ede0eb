"""One module per `moeprof` verb; each defines `register(app)`."""
