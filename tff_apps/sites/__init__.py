"""Sites: training across machines where each data holder keeps its data.

At the site: `prepare` writes the site's data folder (`site_data`); a site is a process next
to that folder: its TFF worker, started in the folder and kept unreachable (`isolation`),
behind a gateway (`gateway`) that accepts only mutual-TLS callers (`certs`), admits only jobs
its policy allows (`policy`), lets no dataset or oversized result leave (`messages`) and logs
every call; `serve` and `commands` run it from the command line and never import TensorFlow.
At the coordinator: `sites_config` lists the sites, `channel` connects to a gateway,
`site_computations` and `site_training` are the TFF computations run at the sites.
See docs/sites.md.
"""
