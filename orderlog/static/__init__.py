"""Files the server hands out over HTTP: the dashboard and the browser client."""
