package catalog

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"gopkg.in/yaml.v3"
)

// ParseCatalog decodes the plans and tenants keys of a config file
// (docs/architecture.md#plans-and-billing-periods) and builds a Catalog of them with NewCatalog:
//
//	plans:
//	  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
//	tenants:
//	  acme: {plan: free, billing_anchor: 2026-01-15, billing_url: "https://…",
//	         customer_id: cus_123, status: active, overrides: {limits: {api_calls: 5000}}}
//
// Decoding is strict: an unknown key, a key given twice or a value of the
// wrong kind is an error. billing_anchor is a date (2026-01-15, midnight UTC)
// or an RFC 3339 time. Anchors (&a, *a) and merge keys (<<) work as in YAML.
// A nil node, the zero Node of a missing key, and null are empty. The error
// joins a *CatalogError for every problem: first those of decoding, in
// document order, then those NewCatalog finds.
func ParseCatalog(plans, tenants *yaml.Node) (*Catalog, error) {
	var d decoder
	var ps []Plan
	for _, e := range d.entries("plans", plans) {
		ps = append(ps, d.plan(e))
	}
	var ts []Tenant
	for _, e := range d.entries("tenants", tenants) {
		ts = append(ts, d.tenant(e))
	}
	c, errs := newCatalog(ps, ts)
	if errs = append(d.errs, errs...); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// LoadCatalogFile reads the plans and tenants of the meterd config file at
// path, ignoring its other keys; for reloads, which must not depend on the
// rest of the file.
func LoadCatalogFile(path string) (*Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	var f struct {
		Plans   yaml.Node `yaml:"plans"`
		Tenants yaml.Node `yaml:"tenants"`
	}
	if err := yaml.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("catalog: %s: %w", path, err)
	}
	c, err := ParseCatalog(&f.Plans, &f.Tenants)
	if err != nil {
		return nil, fmt.Errorf("catalog: %s: %w", path, err)
	}
	return c, nil
}

// decoder turns YAML nodes into plans and tenants, collecting every problem.
type decoder struct{ errs []error }

func (d *decoder) bad(path, msg string) {
	d.errs = append(d.errs, &CatalogError{Path: path, Message: msg})
}

// entry is one key of a mapping and its value.
type entry struct {
	key, path string
	val       *yaml.Node
}

func (d *decoder) plan(e entry) Plan {
	p := Plan{Name: e.key}
	for _, f := range d.entries(e.path, e.val) {
		switch f.key {
		case "period":
			p.Period = Cadence(d.str(f))
		case "limits":
			p.Limits = d.limits(f)
		case "on_exceed":
			p.OnExceed = d.str(f)
		default:
			d.bad(f.path, "unknown key (known keys: period, limits, on_exceed)")
		}
	}
	return p
}

func (d *decoder) tenant(e entry) Tenant {
	t := Tenant{Name: e.key}
	for _, f := range d.entries(e.path, e.val) {
		switch f.key {
		case "plan":
			t.Plan = d.str(f)
		case "billing_anchor":
			t.BillingAnchor = d.date(f)
		case "billing_url":
			t.BillingURL = d.str(f)
		case "customer_id":
			t.CustomerID = d.str(f)
		case "status":
			t.Status = d.str(f)
		case "overrides":
			for _, g := range d.entries(f.path, f.val) {
				if g.key != "limits" {
					d.bad(g.path, "unknown key (known keys: limits)")
					continue
				}
				t.Overrides.Limits = d.limits(g)
			}
		default:
			d.bad(f.path, "unknown key (known keys: plan, billing_anchor, billing_url, customer_id, status, overrides)")
		}
	}
	return t
}

// limits decodes a mapping of meter names to integers; NewCatalog checks the
// names and signs.
func (d *decoder) limits(e entry) map[string]int64 {
	es := d.entries(e.path, e.val)
	if len(es) == 0 {
		return nil
	}
	m := make(map[string]int64, len(es))
	for _, l := range es {
		var n int64
		v := deref(l.val)
		if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!int" || v.Decode(&n) != nil {
			d.bad(l.path, "must be a non-negative integer, not "+describe(v))
			continue
		}
		m[l.key] = n
	}
	return m
}

// str decodes a scalar as its text; null is "".
func (d *decoder) str(e entry) string {
	v := deref(e.val)
	if isNull(v) {
		return ""
	}
	if v.Kind != yaml.ScalarNode {
		d.bad(e.path, "must be a string, not "+describe(v))
		return ""
	}
	return v.Value
}

// date decodes a date or an RFC 3339 time; null is the zero time.
func (d *decoder) date(e entry) time.Time {
	t, err := ParseAnchor(d.str(e))
	if err != nil {
		d.bad(e.path, err.Error())
	}
	return t
}

// ParseAnchor reads a billing anchor as the catalog file and the admin API
// take it: a date (2026-01-15, midnight UTC) or an RFC 3339 time; empty is
// the zero time (no anchor). The error says what is wrong, without the
// field's name, so that each caller names the field its own way.
func ParseAnchor(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	for _, layout := range []string{time.DateOnly, time.RFC3339Nano} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, errors.New("must be a date (2026-01-15) or an RFC 3339 time, not " + strconv.Quote(s))
}

// entries returns the keys of the mapping n in document order, with aliases
// resolved and merge keys expanded; null is an empty mapping. It reports a
// node that is not a mapping, a key that is not a scalar and a key given
// twice, and leaves them out.
func (d *decoder) entries(path string, n *yaml.Node) []entry {
	n = deref(n)
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.MappingNode {
		d.bad(path, "must be a mapping, not "+describe(n))
		return nil
	}
	return d.collect(path, n, true, map[string]bool{}, map[*yaml.Node]bool{n: true})
}

// collect appends the keys of m not in seen, then those of the mappings it
// merges, earlier ones first: YAML's precedence. visited holds the merged
// mappings, so that each counts once and a mapping merging itself ends.
func (d *decoder) collect(path string, m *yaml.Node, own bool, seen map[string]bool, visited map[*yaml.Node]bool) []entry {
	var es []entry
	var merges []*yaml.Node
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := deref(m.Content[i]), m.Content[i+1]
		switch {
		case k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge":
			merges = append(merges, v)
		case k.Kind != yaml.ScalarNode:
			d.bad(path, "keys must be strings, not "+describe(k))
		case seen[k.Value]:
			if own { // a merged key is overridden, not repeated
				d.bad(path+"."+pathKey(k.Value), "duplicate key")
			}
		default:
			seen[k.Value] = true
			es = append(es, entry{key: k.Value, path: path + "." + pathKey(k.Value), val: v})
		}
	}
	for _, v := range merges {
		srcs := []*yaml.Node{deref(v)}
		if srcs[0].Kind == yaml.SequenceNode {
			srcs = srcs[0].Content
		}
		for _, src := range srcs {
			src = deref(src)
			if src.Kind != yaml.MappingNode {
				d.bad(path+".<<", "must be a mapping or a list of mappings, not "+describe(src))
				continue
			}
			if !visited[src] {
				visited[src] = true
				es = append(es, d.collect(path, src, false, seen, visited)...)
			}
		}
	}
	return es
}

// deref resolves aliases and documents to the node they stand for.
func deref(n *yaml.Node) *yaml.Node {
	for n != nil {
		switch {
		case n.Kind == yaml.AliasNode:
			n = n.Alias
		case n.Kind == yaml.DocumentNode && len(n.Content) == 1:
			n = n.Content[0]
		default:
			return n
		}
	}
	return nil
}

func isNull(n *yaml.Node) bool {
	return n == nil || n.Kind == 0 || n.Kind == yaml.DocumentNode ||
		n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names the value of n for an error message.
func describe(n *yaml.Node) string {
	switch {
	case isNull(n):
		return "null"
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	default:
		return strconv.Quote(n.Value)
	}
}
