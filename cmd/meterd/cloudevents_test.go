package main

import (
	"net/http"
	"strconv"
	"testing"
	"time"
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
	e2eUsage(t, s, "globex", want)
	// And it stays there: no retry is counted late.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if got := e2eTenant(t, s, "globex").Usage["api_calls"]; got != want {
			t.Fatalf("usage.api_calls of globex = %d, want %d", got, want)
		}
	}
}

// e2eCloudEvent is a structured-mode CloudEvent of globex's api_calls.
func e2eCloudEvent(source, id string, value int) string {
	return `{"specversion":"1.0","id":"` + id + `","source":"` + source + `","type":"api_calls","subject":"globex","data":{"value":` + strconv.Itoa(value) + `}}`
}
