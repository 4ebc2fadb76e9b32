"""Registries: push and pull images over the OCI distribution API.

One module per concern; import from the module that holds a name (this package
re-exports nothing)::

    errors      RegistryError and its subclasses: what a registry exchange can fail with
    wire        request bodies, capped replies and blob streams, URL origins, error bodies
    auth        WWW-Authenticate challenges, credentials, Basic auth and bearer tokens
    client      RegistryClient: the distribution API over pooled HTTP connections
    transfer    push_image and pull_image: the store <-> registry flows

References (``HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]``) are a value type of their own,
in ``graven.reference``: the CLI, the spec and the builder parse them too.

Registry replies are untrusted: documents are size-capped, digests verified, and
every failure is a ``RegistryError`` that says what to do::

    GravenError
    └── RegistryError              the registry refused or failed, or replied nonsense (exit 1)
        ├── RegistryAuthError      401/403: which credentials to provide
        ├── RegistryNotFound       404: names the missing repository, tag or blob
        └── RegistryUnavailable    down, unreachable, timing out or 5xx after retries

Plain HTTP is used for loopback registries and with ``insecure``; anything else
speaks HTTPS with verified certificates. Credentials go only to the registry's own
origin and to the token realm it names (HTTPS, or loopback).
"""
