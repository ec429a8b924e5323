"""The `pvmit` command line: thin commands over the library, human text on stdout, --json for machines."""
