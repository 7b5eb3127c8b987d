"""Working with Ray clusters: submitting raytrain commands as Ray jobs (`jobs`) and checking the cluster
manifests in `cluster/` (`manifests`). Only the driver side (commands) imports this package."""
