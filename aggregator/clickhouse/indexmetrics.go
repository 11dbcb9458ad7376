package clickhouse

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator/keyindex"
)

// indexMetrics exports the dedup index's Stats as the
// meterd_aggregator_dedup_index_* metrics, read once a scrape.
type indexMetrics struct{ ix *keyindex.Index }

// indexMetric is one of them: its name, help and kind, and its value in
// Stats.
type indexMetric struct {
	name, help string
	kind       prometheus.ValueType
	value      func(keyindex.Stats) float64
}

var indexMetricList = []indexMetric{
	{"meterd_aggregator_dedup_index_keys", "Event keys the dedup index holds on disk (a key added again within the horizon counts once per generation holding it, until a merge or an expiry rewrites them).", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.Keys) }},
	{"meterd_aggregator_dedup_index_recent_keys", "Event keys the dedup index holds in memory, not yet written to disk by a spill.", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.Recent) }},
	{"meterd_aggregator_dedup_index_generations", "Generations of keys on disk (one per spill, merged in the background to keep them few): a lookup the in-memory filter lets through reads each.", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.Generations) }},
	{"meterd_aggregator_dedup_index_filter_keys", "Keys in the dedup index's in-memory filter; 0 while it has none (after a start without a saved filter, until a scan built one) and lookups read the filters on disk.", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.FilterKeys) }},
	{"meterd_aggregator_dedup_index_filter_capacity_keys", "Keys the in-memory filter was sized for (about 1 % false positives at capacity); once it is full, a larger one is built by a scan.", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.FilterCapacity) }},
	{"meterd_aggregator_dedup_index_scanned_keys_total", "Keys read from disk by the finished scans that built an in-memory filter.", prometheus.CounterValue, func(s keyindex.Stats) float64 { return float64(s.Scanned) }},
	{"meterd_aggregator_dedup_index_merges_total", "Merges of generations of the dedup index that finished.", prometheus.CounterValue, func(s keyindex.Stats) float64 { return float64(s.Merges) }},
	{"meterd_aggregator_dedup_index_disk_bytes", "Disk space the dedup index's LSM takes (the saved filter, written at a clean stop, aside).", prometheus.GaugeValue, func(s keyindex.Stats) float64 { return float64(s.DiskBytes) }},
}

// indexDescs are the descriptions of indexMetricList, in its order.
var indexDescs = func() []*prometheus.Desc {
	var ds []*prometheus.Desc
	for _, im := range indexMetricList {
		ds = append(ds, prometheus.NewDesc(im.name, im.help, nil, nil))
	}
	return ds
}()

func (m indexMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range indexDescs {
		ch <- d
	}
}

func (m indexMetrics) Collect(ch chan<- prometheus.Metric) {
	s := m.ix.Stats()
	for i, im := range indexMetricList {
		ch <- prometheus.MustNewConstMetric(indexDescs[i], im.kind, im.value(s))
	}
}
