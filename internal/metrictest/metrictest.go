// Package metrictest holds the rules every metric meterd exports follows,
// and reads metrics in tests.
//
// The rules (Lint) apply to each family named meterd_…:
//
//   - the name is meterd_<component>_<what>, component one of Components,
//     in lower case, digits and single underscores;
//   - a counter ends in _total, and nothing else does;
//   - a histogram or summary ends in a base unit, _seconds or _bytes;
//   - a gauge ends in a base unit or in the thing it counts (GaugeUnits);
//   - no name holds a scaled unit (_ms, _milliseconds, _minutes, _kb, …);
//   - labels are bounded: only the names of Labels, at most MaxSeries
//     series per family. Nothing per tenant, meter, batch or URL;
//   - every family has help text.
package metrictest

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Prefix starts the name of every meterd metric.
const Prefix = "meterd_"

// Components are the second word of a meterd metric name.
var Components = []string{"collector", "aggregator", "enforcer", "gate"}

// GaugeUnits are the suffixes a gauge may end in: base units and the
// things it counts.
var GaugeUnits = []string{"seconds", "bytes", "ratio", "messages", "batches", "events", "tenants", "leases", "keys", "generations"}

// Labels are the label names a meterd metric may have. Each takes a small
// fixed set of values from the code, never one from a request.
var Labels = []string{"reason", "outcome", "result", "type"}

// MaxSeries bounds the series of one family.
const MaxSeries = 16

// scaledUnits are name parts that say a unit is not the base unit.
var scaledUnits = []string{"ms", "us", "ns", "milliseconds", "microseconds", "nanoseconds", "minutes", "hours",
	"days", "kb", "mb", "gb", "kilobytes", "megabytes", "gigabytes", "percent"}

var namePattern = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// Lint returns every way the meterd_ families of mfs break the rules.
// Families of other prefixes (go_, process_) are not meterd's and pass.
func Lint(mfs []*dto.MetricFamily) []error {
	var errs []error
	for _, mf := range mfs {
		name := mf.GetName()
		if !strings.HasPrefix(name, Prefix) {
			continue
		}
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
		}
		if !namePattern.MatchString(name) {
			bad("name must be lower case words joined by single underscores")
		}
		words := strings.Split(name, "_")
		if len(words) < 4 || !slices.Contains(Components, words[1]) {
			bad("name must be meterd_<component>_<what>_<unit>, component one of %v", Components)
		}
		for _, w := range words {
			if slices.Contains(scaledUnits, w) {
				bad("%q is a scaled unit: use seconds or bytes", w)
			}
		}
		last := words[len(words)-1]
		unit := last
		if last == "total" && len(words) > 1 {
			unit = words[len(words)-2]
		}
		switch t := mf.GetType(); t {
		case dto.MetricType_COUNTER:
			if last != "total" {
				bad("a counter must end in _total")
			}
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM, dto.MetricType_SUMMARY:
			if unit != "seconds" && unit != "bytes" {
				bad("a %s must end in _seconds or _bytes", strings.ToLower(t.String()))
			}
		case dto.MetricType_GAUGE:
			if !slices.Contains(GaugeUnits, unit) {
				bad("a gauge must end in one of %v", GaugeUnits)
			}
		default:
			bad("type %s is not used by meterd", t)
		}
		if last == "total" && mf.GetType() != dto.MetricType_COUNTER {
			bad("only counters end in _total")
		}
		if strings.TrimSpace(mf.GetHelp()) == "" {
			bad("no help text")
		}
		if n := len(mf.GetMetric()); n > MaxSeries {
			bad("%d series, more than %d: a label is not bounded", n, MaxSeries)
		}
		seen := map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if l := lp.GetName(); !seen[l] {
					seen[l] = true
					if !slices.Contains(Labels, l) {
						bad("label %q is not one of the bounded labels %v", l, Labels)
					}
				}
			}
		}
	}
	return errs
}

// Check gathers g, fails t for every rule a meterd_ family breaks, and
// checks that g has want meterd_ families: labelled families appear only
// once a series exists, so components create theirs at construction, and
// a family that did not would escape the rules.
func Check(t testing.TB, g prometheus.Gatherer, want int) {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, err := range Lint(mfs) {
		t.Error(err)
	}
	var names []string
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), Prefix) {
			names = append(names, mf.GetName())
		}
	}
	if len(names) != want {
		sort.Strings(names)
		t.Errorf("%d meterd_ families, want %d:\n%s", len(names), want, strings.Join(names, "\n"))
	}
}

// Histogram returns the sample count and sum of histogram name in g.
func Histogram(t testing.TB, g prometheus.Gatherer, name string) (count uint64, sum float64) {
	t.Helper()
	mf := family(t, g, name)
	for _, m := range mf.GetMetric() {
		h := m.GetHistogram()
		if h == nil {
			t.Fatalf("%s is not a histogram", name)
		}
		count += h.GetSampleCount()
		sum += h.GetSampleSum()
	}
	return count, sum
}

// Value returns the value of the counter or gauge name in g whose labels
// are labelPairs (name, value, …); without labels, the sum of its series.
func Value(t testing.TB, g prometheus.Gatherer, name string, labelPairs ...string) float64 {
	t.Helper()
	mf := family(t, g, name)
	var v float64
	found := false
	for _, m := range mf.GetMetric() {
		if !hasLabels(m, labelPairs) {
			continue
		}
		found = true
		switch {
		case m.GetCounter() != nil:
			v += m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			v += m.GetGauge().GetValue()
		default:
			t.Fatalf("%s is neither a counter nor a gauge", name)
		}
	}
	if !found {
		t.Fatalf("%s has no series with labels %v", name, labelPairs)
	}
	return v
}

func family(t testing.TB, g prometheus.Gatherer, name string) *dto.MetricFamily {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf
		}
	}
	t.Fatalf("no metric %s", name)
	return nil
}

func hasLabels(m *dto.Metric, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		ok := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == pairs[i] && lp.GetValue() == pairs[i+1] {
				ok = true
			}
		}
		if !ok {
			return false
		}
	}
	return true
}
