"""qcowlib's built-in validation rules, a module per family.

They use the same interface as third-party rules (:class:`~qcowlib.validate.model.Rule`
over a :class:`~qcowlib.validate.engine.Context`) and emit their findings with the
severities of the ``glance`` policy: an ``error`` for what Glance 33 refuses on upload
(``oslo_utils.imageutils.format_inspector`` safety checks and Glance's ``[image_format]``
checks) and for images that do not parse; a ``warning`` for what Glance accepts but an
operator should know.  Where qcowlib is deliberately stricter than Glance, the rule's
docstring says so (and docs/validation.md lists it).

Families: :mod:`.structural` (the image parses, with the reader's checks),
:mod:`.identity` (declared and detected format), :mod:`.external` (backing and data
files), :mod:`.features` (qcow2 feature bits, encryption), :mod:`.vmdk`,
:mod:`.partitions` (MBR, GPT) and :mod:`.state` (corrupt and dirty bits, the qcow2
check, sizes).

No rule opens any file but the image: names of backing files, data files and extents
are read from the image and reported.
"""

from __future__ import annotations

from typing import Final

from qcowlib.validate.model import Rule
from qcowlib.validate.rules.external import backing_file, data_file
from qcowlib.validate.rules.features import encrypted, unknown_features
from qcowlib.validate.rules.identity import banned_format, format_ambiguous, format_match
from qcowlib.validate.rules.partitions import gpt, mbr
from qcowlib.validate.rules.state import check, corrupt, dirty, image_size, virtual_size
from qcowlib.validate.rules.structural import structure
from qcowlib.validate.rules.vmdk import vmdk_create_type, vmdk_descriptor, vmdk_extent
from qcowlib.validate.structures import declared_virtual_size

__all__ = ["BUILTIN_RULES", "declared_virtual_size"]

#: The built-in rules, in the order they run.
BUILTIN_RULES: Final[tuple[Rule, ...]] = (
    structure,
    format_match,
    format_ambiguous,
    banned_format,
    backing_file,
    data_file,
    unknown_features,
    encrypted,
    vmdk_create_type,
    vmdk_descriptor,
    vmdk_extent,
    mbr,
    gpt,
    corrupt,
    dirty,
    virtual_size,
    image_size,
    check,
)
