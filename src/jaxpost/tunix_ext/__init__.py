"""jaxpost's extensions of Tunix: the places where it replaces or reaches into Tunix's
(and qwix's) code, one module per concern.

Each such place is listed in ``docs/tunix_patches.md`` with what it replaces, where it
is active, why, and the test that checks it. They were written for the versions that
:data:`jaxpost.tunix_ext.versions.WRITTEN_FOR` names, and the functions that install
them refuse any other (:func:`jaxpost.tunix_ext.versions.check_versions`).
"""
