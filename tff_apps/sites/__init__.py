"""Sites: training across machines where each data holder keeps its data.

A site is a process next to the data: its TFF worker, started in the site's data folder and
kept unreachable (isolation), behind a gateway (gateway) that accepts only mutual-TLS
callers (certs), admits only jobs its policy allows (policy), lets no dataset or oversized
result leave (messages) and logs every call. The coordinator connects through `channel`;
`serve` and `commands` run a site from the command line. Imports tff_apps.runtime and
tff_apps.privacy only, and never TensorFlow. See docs/sites.md.
"""
