// Package catalog is the tenant catalog every component reads: plans,
// tenants, their billing periods and anchors
// (docs/architecture.md#plans-and-billing-periods). It parses the plans and
// tenants of the config file and builds an immutable Catalog of them; the
// aggregator reports usage per billing period with it, the enforcer checks
// quotas against a tenant's limits in its current period, and the gates know
// from it which tenants have a plan. Each of them reads it through a
// Watcher, which follows the admin API's changes (and, given a Path, the
// config file) and merges them over the file the one way (Merge).
package catalog
