"""OCI import: untrusted image layouts, archives and manifests in, as graven images.

One module per stage; import from the module that holds a name (this package
re-exports nothing)::

    policy      ImportPolicy (what is accepted), ImportRejected, progress reports
    streams     the verified blob, decompression, the checked tar stream, strict headers
    names       member names, symlink targets and whiteout names
    changes     one layer's members validated and laid over the snapshot below
    documents   index, manifest and config parsed as untrusted JSON
    images      import_from_manifest: a manifest and its blobs, layer by layer
    layouts     import_layout: OCI layout directories and oci-archive tars

Everything read here is hostile until proven otherwise (DESIGN invariant 8). One layer
flows through a chain of streams; nothing is held whole and nothing is extracted::

    open_blob(descriptor)   the source: a layout file, an archive's spool, a registry
      -> VerifiedBlob       exactly ``size`` bytes whose sha256 is ``digest``
      -> gzip | zstd | -    decompression
      -> TarStream          the uncompressed bytes: sha256 == the config's diff_id, a
                            size cap (bombs), a cap on one member's header records,
                            nothing but zeros after the end-of-archive marker
      -> tarfile "r|"       members one at a time (extract/extractall are never called)
      -> LayerChanges       each member validated and recorded as a change (file
                            contents go to the store as blobs), then laid over the
                            previous snapshot as overlayfs would: whiteouts and opaque
                            directories hide lower content, directories merge

The store receives only blobs and tree documents, and temporary files go to its
``tmp/``: nothing is written outside the store, by construction (the malicious-archive
tests check it anyway). Blobs stored before a later check fails are unreferenced and
left to gc; no image or name is recorded unless every check passed.

Decisions:

- Member names: a leading ``./`` and ``.`` components are accepted (``tar -C dir .``
  writes them). A leading ``/`` is **rejected**, not stripped: no layer tool writes
  one, so it marks a crafted or broken archive. ``..`` is rejected anywhere, even where
  it would stay inside. Names must be UTF-8 without NUL, at most 255 bytes a component,
  4096 bytes and ``MAX_DEPTH`` components a path.
- Nothing is altered silently. Setuid/setgid files and device nodes or fifos are
  rejected unless the policy allows them; then the bit is dropped (the store keeps
  only normalized modes: 0o644/0o755 files, 0o755 directories) and device nodes are
  left out (a runtime provides ``/dev``). Setgid and sticky bits on *directories*
  (``/var/mail``, ``/tmp`` in every Debian image) are accepted: they grant nothing.
  Owners, times and extended attributes are ignored, but values no file system
  could hold (ids beyond 32 bits, modes beyond ``MAX_MODE``) are refused, and file
  capabilities (``security.capability``) are treated as setuid.
- Header records are refused where tarfile reads them otherwise than other tools do
  (a member hidden in plain sight is as bad as one written outside): a non-file that
  declares data, a pax number that is not a number, ``GNU.sparse.*`` records, a
  global pax header that renames or resizes the members after it, a GNU long name
  with a NUL inside.
- A member below a path that is a symlink (in this layer or below) is rejected, as is
  one below a file: tools that diff real file systems never write through symlinks,
  and following one is how archives escape their root.
- Whiteouts hide lower-layer content only (image-spec), wherever they stand in the
  tar, so their paths are checked against the layers below: one under a path this
  layer turns into a file or symlink is the old directory's (umoci writes that), one
  under a path that is a symlink below is rejected, as is an opaque whiteout in a
  path that is a symlink or file below (unless this layer made it a directory
  first). An opaque whiteout of the image root, ``.wh.`` with an empty, ``.`` or
  ``..`` target, a whiteout name used as a directory and a whiteout that is not a
  regular file are rejected; AUFS metadata (``.wh..wh.*`` other than the opaque
  marker) is skipped, as other importers do.
- A hardlink becomes a copy of the entry it names (a file or symlink), which must
  already be in the image (earlier in this layer, or below: the image-spec leaves
  cross-layer hardlinks open, Docker and containerd apply them) and must not be
  reached through a symlink.
- Annotations never name anything: only the ref name is read, to match ``--ref`` and
  in messages, and it must fit the image-spec's grammar.
- Documents (index, manifest, config) must be UTF-8 JSON without duplicate keys and
  within size caps; every blob is checked against its descriptor's size and digest,
  and every layer against the config's diff_id. A tar must end with its end-of-archive
  marker, so a truncated layer is caught whatever its compression.
"""
