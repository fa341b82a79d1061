"""The support console: server-rendered pages over the API's own service functions."""
