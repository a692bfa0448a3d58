"""The metadata service: ``secfw metadata serve`` (README, "Metadata service").

* :mod:`.content` — what an instance is served, from the model (pure);
* :mod:`.app` — the HTTP paths (a WSGI application on werkzeug);
* :mod:`.identity` — which port a connection came from, read from conntrack;
* :mod:`.server` — the model kept current from the store, served by waitress.
"""
