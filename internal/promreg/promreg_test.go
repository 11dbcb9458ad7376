package promreg

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestSet: every kind of metric is registered as it is made, with its
// help, labels and buckets; a name registered twice is the error of Err,
// and nothing after it is registered.
func TestSet(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := On(reg)
	c := s.Counter("x_things_total", "Things.")
	cv := s.CounterVec("x_errors_total", "Errors by kind.", "kind")
	g := s.Gauge("x_level", "Level.")
	gv := s.GaugeVec("x_queue", "Queue by name.", "name")
	s.GaugeFunc("x_read", "Read at scrape.", func() float64 { return 42 })
	h := s.Histogram("x_seconds", "Durations.", []float64{1, 2})
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	c.Add(3)
	cv.WithLabelValues("io").Inc()
	g.Set(7)
	gv.WithLabelValues("q").Set(2)
	h.Observe(1.5)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, mf := range mfs {
		line := mf.GetName() + " " + mf.GetType().String() + " " + mf.GetHelp()
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				line += " " + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				line += fmt.Sprint(" ", m.GetCounter().GetValue())
			case m.GetGauge() != nil:
				line += fmt.Sprint(" ", m.GetGauge().GetValue())
			case m.GetHistogram() != nil:
				for _, b := range m.GetHistogram().GetBucket() {
					line += fmt.Sprintf(" le%g:%d", b.GetUpperBound(), b.GetCumulativeCount())
				}
				line += fmt.Sprint(" sum ", m.GetHistogram().GetSampleSum())
			}
		}
		got = append(got, line)
	}
	want := []string{
		"x_errors_total COUNTER Errors by kind. kind=io 1",
		"x_level GAUGE Level. 7",
		"x_queue GAUGE Queue by name. name=q 2",
		"x_read GAUGE Read at scrape. 42",
		"x_seconds HISTOGRAM Durations. le1:0 le2:1 sum 1.5",
		"x_things_total COUNTER Things. 3",
	}
	if !slices.Equal(got, want) {
		t.Errorf("gathered\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	s = On(reg)
	s.Counter("x_new_total", "Before the clash.")
	s.Counter("x_things_total", "Things.")
	s.Counter("x_after_total", "After the clash.")
	var are prometheus.AlreadyRegisteredError
	if err := s.Err(); !errors.As(err, &are) {
		t.Errorf("Err = %v, want the AlreadyRegisteredError of x_things_total", err)
	}
	mfs, err = reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 7 || mfs[0].GetName() != "x_errors_total" || mfs[2].GetName() != "x_new_total" {
		t.Errorf("%d families registered, want the 6 before and x_new_total, not x_after_total", len(mfs))
	}
}
