package clickhouse

import (
	"context"
	"fmt"
	"strconv"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/ext"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

// scope is the usage partition whose tenants a store writes (Config.Partition
// of Config.Partitions); the zero scope writes every tenant.
type scope struct{ partitions, partition int }

// intentPartition is the partition recorded with the store's intents.
func (sc scope) intentPartition() int32 {
	if sc.partitions == 0 {
		return -1
	}
	return int32(sc.partition)
}

// intentsWhere is the WHERE clause of the scope's intents in applies: its
// partition's, and those of a writer of every partition (the zero scope's:
// all of them). Another partition's open intent may be a write in progress,
// which this writer must neither repair nor wait for.
func (sc scope) intentsWhere() string {
	if sc.partitions == 0 {
		return ""
	}
	return " WHERE usage_partition IN (-1, " + strconv.Itoa(sc.partition) + ")"
}

// owns reports whether tenant is the scope's.
func (sc scope) owns(tenant string) bool {
	return sc.partitions == 0 || schemas.Partition(tenant, sc.partitions) == sc.partition
}

// own returns the tenants of the scope among tenants.
func (sc scope) own(tenants []string) []string {
	var out []string
	for _, t := range tenants {
		if sc.owns(t) {
			out = append(out, t)
		}
	}
	return out
}

// check fails, wrapping aggregator.ErrInvalidEvent, if an event of batches
// is another partition's: collectors and aggregators that disagree on the
// number of partitions would otherwise give one tenant two writers. Writing
// nothing, the batch goes to the DLQ with this reason, to be replayed once
// they agree.
func (sc scope) check(batches []*schemas.Batch) error {
	if sc.partitions == 0 {
		return nil
	}
	for _, b := range batches {
		for i := range b.Events {
			if t := b.Events[i].Tenant; !sc.owns(t) {
				return fmt.Errorf("%w: batch %s: tenant %q is in partition %d of %d, this writer's is %d (do the collectors and aggregators agree on --partitions?)",
					aggregator.ErrInvalidEvent, b.ID, t, schemas.Partition(t, sc.partitions), sc.partitions, sc.partition)
			}
		}
	}
	return nil
}

// indexScope names the scope in the dedup index's mark, so that an index of
// another partition (or of every partition) is rebuilt rather than trusted.
func (sc scope) indexScope(storeID string) string {
	if sc.partitions == 0 {
		return storeID
	}
	return storeID + "/p" + strconv.Itoa(sc.partition) + "of" + strconv.Itoa(sc.partitions)
}

// scopeTenants returns the scope's tenants among those query selects (one
// String column). ClickHouse 18.16 cannot compute schemas.Partition (FNV-1a
// over the bytes of a tenant), so tenants are read and filtered here: a
// read of the tenant column of what query selects, sorted and compressed
// in events (ORDER BY tenant, id), and a hash per distinct tenant.
func (s *Store) scopeTenants(ctx context.Context, query string) ([]string, error) {
	rows, err := s.conn.Query(ctx, `SELECT DISTINCT tenant FROM (`+query+`)`)
	if err != nil {
		return nil, fmt.Errorf("tenants of partition %d: %w", s.scope.partition, err)
	}
	defer rows.Close()
	tenants := []string{}
	for rows.Next() {
		var t string
		if err := rows.Scan(&t); err != nil {
			return nil, fmt.Errorf("tenants of partition %d: %w", s.scope.partition, err)
		}
		if s.scope.owns(t) {
			tenants = append(tenants, t)
		}
	}
	return tenants, rows.Err()
}

// withTenants returns ctx carrying tenants as the external table scope
// (column tenant), for a query's "tenant IN scope".
func withTenants(ctx context.Context, tenants []string) (context.Context, error) {
	tbl, err := ext.NewTable("scope", ext.Column("tenant", "String"))
	if err != nil {
		return nil, err
	}
	if _, err := tbl.Block().Columns[0].Append(tenants); err != nil {
		return nil, err
	}
	return clickhouse.Context(ctx, clickhouse.WithExternalTable(tbl)), nil
}
