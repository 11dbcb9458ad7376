package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/internal/metrictest"
)

const (
	dashboardPath = "../../deploy/grafana/meterd.json"
	alertsPath    = "../../deploy/grafana/alerts.yml"
)

// design7Metrics are the metrics docs/architecture.md#operating names, each as the family that
// exports it. The dashboard must chart each, and meterd dev export each.
var design7Metrics = map[string]string{
	"events accepted":           "meterd_collector_events_accepted_total",
	"events rejected by reason": "meterd_collector_events_rejected_total",
	"publish latency":           "meterd_collector_publish_duration_seconds",
	"spool depth":               "meterd_collector_spool_batches",
	"consumer lag":              "meterd_aggregator_consumer_lag_seconds",
	"consumer lag (batches)":    "meterd_aggregator_consumer_lag_messages",
	"batch flush latency":       "meterd_aggregator_flush_duration_seconds",
	"store write latency":       "meterd_aggregator_store_write_duration_seconds",
	"decisions by reason":       "meterd_enforcer_decisions_total",
	"402s by reason":            "meterd_collector_payment_required_total",
	"gate staleness":            "meterd_gate_staleness_seconds",
	"freshness histogram":       "meterd_gate_freshness_seconds",
}

// Every metric the Grafana dashboard and the alerting rules query is
// exported by `meterd dev` after some traffic, and so is every metric
// docs/architecture.md#operating names; each follows the naming rules.
func TestDashboardMetricsExported(t *testing.T) {
	dash := dashboardQueries(t, dashboardPath)
	alerts := alertQueries(t, alertsPath)
	if len(dash) < 20 || len(alerts) < 5 {
		t.Fatalf("%d dashboard and %d alert queries found, want at least 20 and 5", len(dash), len(alerts))
	}

	s := startE2EDev(t, e2eConfig)
	// acme (1000 api_calls) crosses its limit; /v1/check then answers 402,
	// which makes the gate observe freshness.
	body := e2eEvents(nil, 1, "acme", 1001)
	if r, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}}, body); err != nil || r.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events: %v %+v", err, r)
	}
	s.waitCheck(t, "acme", http.StatusPaymentRequired, time.Now(), 10*time.Second)
	s.mustCheck(t, "globex")
	var fams map[string]*dto.MetricFamily
	deadline := time.Now().Add(10 * time.Second)
	for {
		fams = scrape(t, s)
		if histogramCount(fams["meterd_gate_freshness_seconds"]) > 0 && histogramCount(fams["meterd_enforcer_freshness_seconds"]) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no freshness observed 10 s after the first 402")
		}
		time.Sleep(20 * time.Millisecond)
	}

	for _, q := range append(dash, alerts...) {
		for _, name := range missingMetrics(q.expr, fams) {
			t.Errorf("%s queries %s, which meterd does not export: %s", q.where, name, q.expr)
		}
	}
	queried := map[string]bool{}
	for _, q := range dash {
		for _, name := range promqlMetrics(q.expr) {
			queried[familyOf(name, fams)] = true
		}
	}
	for what, name := range design7Metrics {
		if fams[name] == nil {
			t.Errorf("operating metric %s: %s not exported", what, name)
		}
		if !queried[name] {
			t.Errorf("operating metric %s: %s not on the dashboard", what, name)
		}
	}
	var all []*dto.MetricFamily
	for _, mf := range fams {
		all = append(all, mf)
	}
	for _, err := range metrictest.Lint(all) {
		t.Error(err)
	}

	// Freshness as the gate measured it is in the range of what a client
	// sees: more than nothing, less than the 10 s the 402 took at most.
	if f := fams["meterd_gate_freshness_seconds"]; histogramCount(f) != 1 {
		t.Errorf("gate freshness observed %d times for one crossing, want 1", histogramCount(f))
	} else if sum := f.GetMetric()[0].GetHistogram().GetSampleSum(); sum <= 0 || sum > 10 {
		t.Errorf("gate freshness %.3f s, want within (0, 10]", sum)
	}
	if got := fams["meterd_collector_events_accepted_total"].GetMetric()[0].GetCounter().GetValue(); got < 1001 {
		t.Errorf("events accepted = %v, want ≥ 1001", got)
	}
}

// The check fails on a metric meterd does not export, on a histogram
// suffix of a family that is no histogram, and passes the real ones.
func TestMissingMetrics(t *testing.T) {
	fams := map[string]*dto.MetricFamily{
		"meterd_collector_events_accepted_total": {Type: dto.MetricType_COUNTER.Enum()},
		"meterd_gate_freshness_seconds":          {Type: dto.MetricType_HISTOGRAM.Enum()},
		"meterd_gate_staleness_seconds":          {Type: dto.MetricType_GAUGE.Enum()},
	}
	tests := []struct {
		expr string
		want []string
	}{
		{`sum(rate(meterd_collector_events_accepted_total[5m]))`, nil},
		{`histogram_quantile(0.99, sum by (le) (rate(meterd_gate_freshness_seconds_bucket[$__rate_interval])))`, nil},
		{`sum(rate(meterd_gate_freshness_seconds_sum[5m])) / sum(rate(meterd_gate_freshness_seconds_count[5m]))`, nil},
		{`sum(rate(meterd_collector_bogus_total[5m]))`, []string{"meterd_collector_bogus_total"}},
		{`meterd_collector_events_accepted_count`, []string{"meterd_collector_events_accepted_count"}},
		{`meterd_gate_staleness_seconds_bucket`, []string{"meterd_gate_staleness_seconds_bucket"}},
		{`max(meterd_gate_staleness_seconds) > 15 or absent(meterd_gate_stalenes_seconds)`, []string{"meterd_gate_stalenes_seconds"}},
		{`{__name__=~"meterd_gate_.*"}`, []string{"__name__"}},
	}
	for _, tt := range tests {
		if got := missingMetrics(tt.expr, fams); !slices.Equal(got, tt.want) {
			t.Errorf("missingMetrics(%s) = %v, want %v", tt.expr, got, tt.want)
		}
	}
}

func TestPromQLMetrics(t *testing.T) {
	tests := []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`sum by (le) (rate(a_bucket{le="1", reason=~"x|y"}[5m]))`, []string{"a_bucket"}},
		{`histogram_quantile(0.99, sum without (instance) (rate(a_bucket[$__rate_interval])))`, []string{"a_bucket"}},
		{`max by (instance) (a / b) > 0.5`, []string{"a", "b"}},
		{`sum(rate(a{outcome=~"published|replayed"}[10m])) > 0 unless sum(rate(b[10m])) > 0`, []string{"a", "b"}},
		{`a * on(instance) group_left(version) b offset 1h`, []string{"a", "b"}},
		{`label_replace(a, "dst", "$1", "src", "(.*)")`, []string{"a"}},
		{`count(a) by (reason) + topk(3, b) or vector(0)`, []string{"a", "b"}},
		{`rate(a[5m:30s]) and bool c # a comment names d`, []string{"a", "c"}},
		{`{__name__="a"}`, nil},
		{`sum(x{job="${job}"}) / 1e3 + 0x10 - Inf`, []string{"x"}},
	}
	for _, tt := range tests {
		if got := promqlMetrics(tt.expr); !slices.Equal(got, tt.want) {
			t.Errorf("promqlMetrics(%s) = %q, want %q", tt.expr, got, tt.want)
		}
	}
}

// query is a PromQL expression and where it was found.
type query struct {
	where, expr string
}

// dashboardQueries returns the expression of every target of every panel
// of the Grafana dashboard at path (panels of collapsed rows included), and
// checks that each panel and target uses the ${DS_PROMETHEUS} input.
func dashboardQueries(t *testing.T, path string) []query {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	type datasource struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	}
	type panel struct {
		Title      string      `json:"title"`
		Type       string      `json:"type"`
		Datasource *datasource `json:"datasource"`
		Targets    []struct {
			Expr       string      `json:"expr"`
			Datasource *datasource `json:"datasource"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var dash struct {
		Inputs []struct {
			Name     string `json:"name"`
			PluginID string `json:"pluginId"`
		} `json:"__inputs"`
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if len(dash.Inputs) != 1 || dash.Inputs[0].Name != "DS_PROMETHEUS" || dash.Inputs[0].PluginID != "prometheus" {
		t.Errorf("%s: __inputs = %+v, want the one Prometheus datasource input DS_PROMETHEUS", path, dash.Inputs)
	}
	isInput := func(d *datasource) bool { return d != nil && d.Type == "prometheus" && d.UID == "${DS_PROMETHEUS}" }
	var out []query
	var walk func(raw []json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("%s: panel: %v", path, err)
			}
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if !isInput(p.Datasource) {
				t.Errorf("panel %q: datasource %+v, want the ${DS_PROMETHEUS} input", p.Title, p.Datasource)
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for i, tg := range p.Targets {
				if !isInput(tg.Datasource) {
					t.Errorf("panel %q target %d: datasource %+v, want the ${DS_PROMETHEUS} input", p.Title, i, tg.Datasource)
				}
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q target %d has no expr", p.Title, i)
					continue
				}
				out = append(out, query{where: fmt.Sprintf("panel %q", p.Title), expr: tg.Expr})
			}
		}
	}
	walk(dash.Panels)
	return out
}

// alertQueries returns the expression of every rule of the Prometheus
// rules file at path.
func alertQueries(t *testing.T, path string) []query {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(data, &rules); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []query
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			out = append(out, query{where: "alert " + r.Alert, expr: r.Expr})
		}
	}
	return out
}

// scrape reads the dev server's /metrics.
func scrape(t *testing.T, s *e2eDev) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := s.client.Get(s.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

func histogramCount(mf *dto.MetricFamily) uint64 {
	var n uint64
	for _, m := range mf.GetMetric() {
		n += m.GetHistogram().GetSampleCount()
	}
	return n
}

// missingMetrics returns the metrics expr selects that fams lacks. A
// selector by __name__ cannot be checked and counts as missing.
func missingMetrics(expr string, fams map[string]*dto.MetricFamily) []string {
	var missing []string
	if strings.Contains(expr, "__name__") {
		missing = append(missing, "__name__")
	}
	for _, name := range promqlMetrics(expr) {
		if familyOf(name, fams) == "" {
			missing = append(missing, name)
		}
	}
	return missing
}

// familyOf returns the family of fams that exports series name: the family
// of that name, or the histogram (summary) whose _bucket (_sum, _count)
// series it is; "" when there is none.
func familyOf(name string, fams map[string]*dto.MetricFamily) string {
	if fams[name] != nil {
		return name
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok || fams[base] == nil {
			continue
		}
		switch fams[base].GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			return base
		case dto.MetricType_SUMMARY:
			if suffix != "_bucket" {
				return base
			}
		}
	}
	return ""
}

// promqlKeywords are identifiers of PromQL that are not metric names.
var promqlKeywords = []string{
	"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2",
	"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
	"limitk", "limit_ratio", "inf", "nan",
}

// promqlMetrics returns the metric names expr selects, in order, once
// each. It skips strings, label matchers, ranges, Grafana variables,
// numbers, keywords, and functions (an identifier followed by "(").
func promqlMetrics(expr string) []string {
	var names []string
	s := []rune(expr)
	isIdent := func(r rune, first bool) bool {
		return r == '_' || r == ':' || unicode.IsLetter(r) || (!first && unicode.IsDigit(r))
	}
	// skipTo returns the index after the close matching the open at i,
	// stepping over strings.
	skipTo := func(i int, open, close rune) int {
		depth := 0
		for ; i < len(s); i++ {
			switch r := s[i]; {
			case r == '"' || r == '\'' || r == '`':
				i = skipString(s, i) - 1
			case r == open:
				depth++
			case r == close:
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return i
	}
	for i := 0; i < len(s); {
		r := s[i]
		switch {
		case r == '"' || r == '\'' || r == '`':
			i = skipString(s, i)
		case r == '{':
			i = skipTo(i, '{', '}')
		case r == '[':
			i = skipTo(i, '[', ']')
		case r == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case r == '$': // $var, ${var}, $__rate_interval
			i++
			if i < len(s) && s[i] == '{' {
				i = skipTo(i, '{', '}')
			}
			for i < len(s) && isIdent(s[i], false) {
				i++
			}
		case unicode.IsDigit(r) || r == '.':
			for i < len(s) && (unicode.IsLetter(s[i]) || unicode.IsDigit(s[i]) || s[i] == '.') {
				i++
			}
		case isIdent(r, true):
			j := i
			for j < len(s) && isIdent(s[j], false) {
				j++
			}
			word := string(s[i:j])
			k := j
			for k < len(s) && unicode.IsSpace(s[k]) {
				k++
			}
			nextParen := k < len(s) && s[k] == '('
			switch {
			case slices.Contains([]string{"by", "without", "on", "ignoring", "group_left", "group_right"}, word) && nextParen:
				j = skipTo(k, '(', ')') // a label list
			case slices.Contains(promqlKeywords, strings.ToLower(word)), nextParen:
			default:
				if !slices.Contains(names, word) {
					names = append(names, word)
				}
			}
			i = j
		default:
			i++
		}
	}
	return names
}

// skipString returns the index after the string literal starting at i.
func skipString(s []rune, i int) int {
	quote := s[i]
	for i++; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if quote != '`' {
				i++
			}
		case quote:
			return i + 1
		}
	}
	return i
}
