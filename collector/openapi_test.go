package collector

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/api/apitest"
	"github.com/meterd/meterd/gate"
)

// The collector's answers `meterd dev` cannot be brought to give (cmd/meterd's
// TestOpenAPIExchanges has the others), from the real handlers, validated
// against api/openapi.yaml: 413 event-too-large, 408 body-timeout, 429
// spool-full, 503 overloaded, 503 blocklist-stale and 503 unavailable.
func TestOpenAPICollectorAnswers(t *testing.T) {
	v := apitest.New(t)
	admin := http.Header{"Authorization": {"Bearer " + ingestAdminKey}, "Content-Type": {"application/json"}}
	post := func(base string, x apitest.Exchange) apitest.Answer {
		t.Helper()
		x.Method, x.URL = http.MethodPost, base+"/v1/events"
		if x.Header == nil {
			x.Header = admin
		}
		return v.Do(t, http.DefaultClient, x)
	}

	t.Run("event-too-large", func(t *testing.T) {
		env := newIngestEnv(t, func(c *Config) { c.BatchMaxBytes = MinBatchMaxBytes })
		body, _ := eventsBody("big", 9000)
		post(env.srv.URL, apitest.Exchange{Name: "an event larger than a batch", Body: body, Status: 413, Problem: "event-too-large", Conforms: true})
	})

	t.Run("spool-full", func(t *testing.T) {
		env := newIngestEnv(t, func(c *Config) { c.SpoolMaxBytes = 600 })
		env.ns.Stop()
		for deadline := time.Now().Add(5 * time.Second); env.nc.IsConnected() && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		post(env.srv.URL, apitest.Exchange{Name: "spooled", Body: []byte(`{"id":"s1","tenant":"acme","meter":"api_calls"}`), Status: 202, Conforms: true})
		big := `[` + strings.Repeat(`{"id":"s2","tenant":"acme","meter":"api_calls","dimensions":{"route":"/a/long/route/name"}},`, 9) + `{"id":"s3","tenant":"acme","meter":"api_calls"}]`
		post(env.srv.URL, apitest.Exchange{Name: "no room in the spool", Body: []byte(big), Status: 429, Problem: "spool-full", Conforms: true})
	})

	t.Run("overloaded", func(t *testing.T) {
		const maxBody = 1 << 20
		env := newIngestEnv(t, func(c *Config) { c.MaxBodyBytes, c.MaxInflightBodyBytes = maxBody, maxBody })
		slowBody, _ := eventsBody("slow", 600<<10)
		slow := startSlowPost(t, env.srv.URL, len(slowBody), slowBody[:10])
		for deadline := time.Now().Add(5 * time.Second); env.col.inflight.used.Load() < int64(len(slowBody)); {
			if time.Now().After(deadline) {
				t.Fatal("the slow request never held its body's bytes")
			}
			time.Sleep(5 * time.Millisecond)
		}
		plain, _ := eventsBody("plain", 500<<10)
		post(env.srv.URL, apitest.Exchange{Name: "no room for the body", Body: plain, Status: 503, Problem: "overloaded", Conforms: true})
		resp, body := slow.finish(t, slowBody[10:])
		v.Check(t, apitest.Exchange{Name: "the slow request", Method: "POST", URL: env.srv.URL + "/v1/events", Header: admin, Body: slowBody, Status: 202, Conforms: true},
			apitest.Answer{Status: resp.StatusCode, Header: resp.Header, Body: body})
	})

	t.Run("body-timeout", func(t *testing.T) {
		env := newIngestEnv(t, nil)
		mux := http.NewServeMux()
		env.col.Register(mux)
		srv := httptest.NewUnstartedServer(mux)
		srv.Config.ReadTimeout = 300 * time.Millisecond
		srv.Start()
		t.Cleanup(srv.Close)
		body := []byte(`{"id":"slow-1","tenant":"acme","meter":"api_calls"}`)
		slow := startSlowPost(t, srv.URL, len(body), body[:5])
		time.Sleep(600 * time.Millisecond)
		resp, answer := slow.finish(t, nil)
		v.Check(t, apitest.Exchange{Name: "a body slower than the read timeout", Method: "POST", URL: srv.URL + "/v1/events", Header: admin, Body: body,
			Status: 408, Problem: "body-timeout", Conforms: true}, apitest.Answer{Status: resp.StatusCode, Header: resp.Header, Body: answer})
	})

	t.Run("blocklist-stale", func(t *testing.T) {
		env := newStaleDenyEnv(t)
		v.Do(t, http.DefaultClient, apitest.Exchange{Name: "stale, deny", Method: "GET", URL: env.srv.URL + "/v1/check",
			Header: http.Header{"X-Tenant-Id": {"initech"}}, Status: 503, Problem: "blocklist-stale", Conforms: true})

	})

	t.Run("unavailable", func(t *testing.T) {
		b := startTestBroker(t)
		nc := connectTestNATS(t, b.URL(), "openapi")
		cfg := Config{NATS: nc, KnownTenant: func(string) bool { return true }}
		if _, err := createBlocklist(&cfg); err != nil {
			t.Fatal(err)
		}
		cfg.Gate = runGate(t, gate.Config{NATS: nc})
		tc := startTestCollector(t, cfg)
		// Run stops while the server still answers: the check cannot
		// record the call.
		tc.stop()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			tc.pipe.closing.RLock()
			closed := tc.pipe.closed
			tc.pipe.closing.RUnlock()
			if closed {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the pipeline did not close after Run stopped")
			}
		}
		v.Do(t, http.DefaultClient, apitest.Exchange{Name: "check while shutting down", Method: "GET", URL: tc.srv.URL + "/v1/check/orders",
			Header: http.Header{"X-Tenant-Id": {"initech"}}, Status: 503, Problem: "unavailable", Conforms: true})
	})
}
