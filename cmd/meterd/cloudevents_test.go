package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
)

// CloudEvents through `meterd dev`, oracle-based: every event answered 202
// in structured, batched and binary mode, retries and the same id from
// other sources included, against the tenant's total. Identity is
// (source, id) across the modes; a plain event's id is its own.
func TestCloudEventsCountedOncePerSourceAndID(t *testing.T) {
	s := startE2EDev(t, e2eConfig)
	structured := func(source, id string, value int) (http.Header, string) {
		return http.Header{"Content-Type": {"application/cloudevents+json"}}, e2eCloudEvent(source, id, value)
	}
	batch := func(events ...string) (http.Header, string) {
		body := "["
		for i, e := range events {
			if i > 0 {
				body += ","
			}
			body += e
		}
		return http.Header{"Content-Type": {"application/cloudevents-batch+json"}}, body + "]"
	}
	binary := func(source, id string, value int) (http.Header, string) {
		return http.Header{"Content-Type": {"application/json"}, "Ce-Specversion": {"1.0"}, "Ce-Id": {id},
			"Ce-Source": {source}, "Ce-Type": {"api_calls"}, "Ce-Subject": {"globex"}}, `{"value":` + strconv.Itoa(value) + `}`
	}
	type req struct {
		h    http.Header
		body string
	}
	r := func(h http.Header, body string) req { return req{h, body} }
	// Each (source, id) carries one value, the same in every retry.
	reqs := []req{
		r(structured("gw-1", "42", 3)),
		r(structured("gw-2", "42", 5)),                                            // same id, another source: counted
		r(structured("gw-1", "42", 3)),                                            // retry: once
		r(batch(e2eCloudEvent("gw-1", "43", 7), e2eCloudEvent("gw-3", "42", 11))), // two more
		r(batch(e2eCloudEvent("gw-1", "43", 7), e2eCloudEvent("gw-1", "42", 3))),  // a retried batch
		r(binary("gw-1", "44", 13)),                                               // binary mode
		r(binary("gw-1", "44", 13)),                                               // its retry
		r(binary("gw%201%25", "42", 17)),                                          // source "gw 1%", percent-encoded
		r(binary("gw-2", "42", 5)),                                                // structured gw-2/42 again, in binary mode
		r(http.Header{"Content-Type": {"application/json"}}, `{"id":"42","tenant":"globex","meter":"api_calls","value":19}`), // plain: its own id
		r(http.Header{"Content-Type": {"application/json"}}, `{"id":"42","tenant":"globex","meter":"api_calls","value":19}`),
	}
	const want = 3 + 5 + 7 + 11 + 13 + 17 + 19
	wantSDK := sendWithCloudEventsSDK(t, s)
	for i, q := range reqs {
		a, err := s.do(http.MethodPost, "/v1/events", q.h, []byte(q.body))
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusAccepted {
			t.Fatalf("request %d: %d %s", i, a.status, a.body)
		}
	}
	// Refused: not counted.
	for _, q := range []req{
		r(http.Header{"Content-Type": {"application/cloudevents+json"}}, `{"specversion":"1.0","id":"99","type":"api_calls","subject":"globex","data":{"value":1000}}`),
		r(http.Header{"Content-Type": {"application/json"}}, "{\"id\":\"u\xff\",\"tenant\":\"globex\",\"meter\":\"api_calls\",\"value\":1000}"),
	} {
		if a, err := s.do(http.MethodPost, "/v1/events", q.h, []byte(q.body)); err != nil || a.status != http.StatusUnprocessableEntity {
			t.Fatalf("%s: %v %+v", q.body, err, a)
		}
	}
	e2eUsage(t, s, "globex", want+wantSDK)
	// And it stays there: no retry is counted late.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if got := e2eTenant(t, s, "globex").Usage["api_calls"]; got != want+wantSDK {
			t.Fatalf("usage.api_calls of globex = %d, want %d", got, want+wantSDK)
		}
	}
}

// sendWithCloudEventsSDK sends globex's api_calls through the official
// CloudEvents Go SDK in each HTTP mode it can send (binary, its default,
// and structured; it can only receive batches, so the batch is the SDK's
// own JSON form of its events) to s, through a proxy that loses the first
// answer to each request, so that every request reaches meterd twice: the
// SDK's own retry. It returns the sum of the values of the distinct
// (source, id) pairs sent, each of which must count once.
func sendWithCloudEventsSDK(t *testing.T, s *e2eDev) int64 {
	t.Helper()
	var mu sync.Mutex
	seen := map[string]int{} // request → times meterd answered 202
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h := http.Header{}
		for k, vs := range r.Header {
			if k == "Content-Type" || strings.HasPrefix(k, "Ce-") {
				h[k] = vs
			}
		}
		a, err := s.do(http.MethodPost, "/v1/events", h, body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		key := fmt.Sprint(h) + string(body) // fmt sorts the map
		mu.Lock()
		first := seen[key] == 0
		if a.status == http.StatusAccepted {
			seen[key]++
		}
		mu.Unlock()
		if first && a.status == http.StatusAccepted {
			// Accepted, but the answer is lost on its way back.
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", a.header.Get("Content-Type"))
		w.WriteHeader(a.status)
		w.Write(a.body)
	}))
	t.Cleanup(proxy.Close)
	client, err := cloudevents.NewClientHTTP(cloudevents.WithTarget(proxy.URL))
	if err != nil {
		t.Fatal(err)
	}
	event := func(source, id string, value int64, dims map[string]any) cloudevents.Event {
		e := cloudevents.NewEvent()
		e.SetID(id)
		e.SetSource(source)
		e.SetType("api_calls")
		e.SetSubject("globex")
		e.SetTime(time.Now())
		data := map[string]any{"value": value}
		maps.Copy(data, dims)
		if err := e.SetData(cloudevents.ApplicationJSON, data); err != nil {
			t.Fatal(err)
		}
		return e
	}
	// The SDK retries a send whose answer was lost (503).
	ctx := cloudevents.ContextWithRetriesConstantBackoff(t.Context(), 10*time.Millisecond, 3)
	send := func(ctx context.Context, e cloudevents.Event, retries int) {
		t.Helper()
		res := client.Send(ctx, e)
		var rr *cehttp.RetriesResult
		if !cloudevents.IsACK(res) || !errors.As(res, &rr) || rr.Retries != retries {
			t.Fatalf("SDK send of %s/%s: %v, want an ACK after %d retries", e.Source(), e.ID(), res, retries)
		}
	}
	eu1a := event("https://gw.example.com/eu-1", "sdk-1", 101, map[string]any{"route": "/a", "status": 200})
	eu1b := event("https://gw.example.com/eu-1", "sdk-2", 103, nil)
	// Not ASCII: the SDK sends the header as raw UTF-8, which reads the
	// same percent-decoded (it has no "%").
	zurich := event("urn:gw:zürich", "sdk-4", 127, nil)
	binary := []cloudevents.Event{
		eu1a, eu1b, zurich,
		event("https://gw.example.com/us-1", "sdk-1", 107, nil), // same id, another source
		event("gw-1", "42", 3, nil),                             // sent in structured mode before: counted there
	}
	for _, e := range binary {
		send(ctx, e, 1)
		send(ctx, e, 0) // the client's own retry, later: counted once
	}
	// Data given to the SDK as bytes goes out as data_base64 in
	// structured mode: read as data, its value counts.
	raw := event("https://gw.example.com/eu-1", "sdk-5", 0, nil)
	if err := raw.SetData(cloudevents.ApplicationJSON, []byte(`{"value":131,"route":"/c"}`)); err != nil {
		t.Fatal(err)
	}
	structured := []cloudevents.Event{
		raw,
		event("https://gw.example.com/eu-1", "sdk-3", 109, map[string]any{"route": "/b"}),
		eu1a,   // sent in binary mode before
		zurich, // likewise
	}
	for _, e := range structured {
		send(cloudevents.WithEncodingStructured(ctx), e, 1)
	}
	// A batch of the SDK's events in its own JSON form, as its receiving
	// side reads them (cehttp.NewEventsFromHTTPRequest), posted until
	// an answer comes back.
	batch, err := json.Marshal([]cloudevents.Event{event("https://gw.example.com/eu-2", "sdk-1", 113, nil), eu1b})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(batch))
	req.Header.Set("Content-Type", cloudevents.ApplicationCloudEventsBatchJSON)
	if got, err := cehttp.NewEventsFromHTTPRequest(req); err != nil || len(got) != 2 {
		t.Fatalf("the SDK reads the batch as %d events: %v", len(got), err)
	}
	for _, want := range []int{http.StatusServiceUnavailable, http.StatusAccepted} {
		a, err := fetch(http.DefaultClient, http.MethodPost, proxy.URL, http.Header{"Content-Type": {cloudevents.ApplicationCloudEventsBatchJSON}}, batch)
		if err != nil || a.status != want {
			t.Fatalf("batch: %v %+v, want %d", err, a, want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var accepted int
	for _, n := range seen {
		accepted += n
	}
	if want := 3*len(binary) + 2*len(structured) + 2; accepted != want || len(seen) != len(binary)+len(structured)+1 {
		t.Errorf("meterd accepted %d requests (%d distinct), want %d (%d)", accepted, len(seen), want, len(binary)+len(structured)+1)
	}
	return 101 + 103 + 107 + 109 + 113 + 127 + 131
}

// e2eCloudEvent is a structured-mode CloudEvent of globex's api_calls.
func e2eCloudEvent(source, id string, value int) string {
	return `{"specversion":"1.0","id":"` + id + `","source":"` + source + `","type":"api_calls","subject":"globex","data":{"value":` + strconv.Itoa(value) + `}}`
}
