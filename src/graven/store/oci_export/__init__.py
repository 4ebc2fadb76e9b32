"""OCI export: graven images out as reproducible OCI image layouts and archives.

One module per concern; import from the module that holds a name (this package
re-exports nothing)::

    compress    gzip / zstd / none compressors with fixed output, a digesting sink
    tar         the normalized tar of a layer's change set (write_layer_tar)
    layers      layer_blob: a layer compressed into the store, its descriptor cached
    documents   oci_documents: an image's config and manifest, and its layer blobs
    layout      export_layout and export_archive: the OCI image layout on disk

Output depends only on the image and ``SOURCE_DATE_EPOCH`` (and the zlib/zstd library
versions), never on the time, umask or working directory; the one host-dependent field
is the config's ``architecture``.
"""
