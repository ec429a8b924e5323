"""Fleet planning: which VMs may move to which hosts, what each move would force, at cloud scale.

inventory  the inventory's schema and its readers (JSON, CSV, Parquet), with row errors naming file, row, field
classes    hosts and VMs collapsed into equivalence classes before any pairing
plan       class x class verdicts from the interface's own policy, expanded per VM with vectorised joins
tables     the plan as Arrow tables (Parquet/CSV), per-VM destination lists on request
document   the plan as one JSON document
report     one self-contained HTML report
generate   synthetic fleets built on catalog models, and the shipped sample inventory
"""
