package collector

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/schemas"
)

// bodyPool holds the buffers bodies are read into, so a steady stream of
// large requests reuses them instead of growing new ones.
var bodyPool = sync.Pool{New: func() any { return new([]byte) }}

// handleEvents is POST /v1/events (docs/architecture.md#http-apis).
func (c *Collector) handleEvents(w http.ResponseWriter, r *http.Request) {
	principal, err := c.cfg.Keys.Authenticate(r)
	if err != nil {
		c.metrics.rejected.WithLabelValues(rejectAuth).Inc()
		auth.Unauthorized(w, err)
		return
	}
	buf := bodyPool.Get().(*[]byte)
	body, release, p := c.readBody(w, r, (*buf)[:0])
	defer func() {
		release()
		if int64(cap(body)) <= c.cfg.MaxBodyBytes+1 {
			*buf = body[:0]
			bodyPool.Put(buf)
		}
	}()
	if p != nil {
		// The discard below may last until the read timeout: it holds no
		// budget and no body bytes (the deferred put then pools nothing).
		release()
		body, *buf = nil, nil
		discardBody(w, r, p, c.cfg.MaxBodyBytes)
		return
	}
	// The header too: a binary-mode CloudEvent's attributes are ce-* headers.
	decoded, err := schemas.DecodeRequest(r.Header, body)
	if err != nil {
		c.decodeProblem(err).Write(w)
		return
	}
	events, duplicates, p := c.admit(principal, decoded)
	if p != nil {
		p.Write(w)
		return
	}
	if err := c.pipe.add(r.Context(), events); err != nil {
		c.deliveryProblem(w, err, len(events)+duplicates)
		return
	}
	c.metrics.accepted.Add(float64(len(events)))
	c.metrics.duplicates.Add(float64(duplicates))
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusAccepted)
	fmt.Fprintf(w, `{"accepted":%d,"duplicates":%d}`+"\n", len(events), duplicates)
}

// readBody reads the (possibly gzip-compressed) body, appending it to dst,
// bounded by MaxBodyBytes before and after decompression and by the budget
// of body bytes in flight (MaxInflightBodyBytes): a request that does not
// fit is answered 503 before its body is read, or, when only decompression
// tells its size, as soon as it outgrows the room left. Memory grows with
// the bytes that arrive, never up front from the client's Content-Length.
// The caller must call release once it no longer holds the body or what was
// decoded from it; release is never nil.
func (c *Collector) readBody(w http.ResponseWriter, r *http.Request, dst []byte) (body []byte, release func(), p *schemas.Problem) {
	limit := c.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return dst, func() {}, c.tooLarge()
	}
	enc := strings.ToLower(r.Header.Get("Content-Encoding"))
	res := &bodyReservation{budget: c.inflight, max: limit}
	first, size := int64(minReservation), int64(-1)
	if r.ContentLength >= 0 && (enc == "" || enc == "identity") {
		first, size = r.ContentLength, r.ContentLength // exactly what the body will hold
	} else if r.ContentLength > first {
		first = min(r.ContentLength, limit)
	}
	if !res.grow(first) {
		return dst, res.release, c.overloaded(w)
	}
	var in io.Reader = http.MaxBytesReader(w, r.Body, limit)
	switch enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(in)
		if err != nil {
			c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
			return dst, res.release, schemas.NewProblem(schemas.ProblemMalformedBody, "the body is not valid gzip: "+err.Error())
		}
		defer zr.Close()
		// One byte over the limit tells a too-large body from a full one.
		in = io.LimitReader(zr, limit+1)
	default:
		c.metrics.rejected.WithLabelValues(rejectMediaType).Inc()
		return dst, res.release, schemas.NewProblem(schemas.ProblemUnsupportedContentEncoding,
			fmt.Sprintf("Content-Encoding %q is not supported; send identity or gzip", enc))
	}
	body, err := readAll(dst, &budgetReader{r: in, res: res}, size)
	if err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			return body, res.release, c.tooLarge()
		case errors.Is(err, errOverBudget):
			return body, res.release, c.overloaded(w)
		case errors.Is(err, os.ErrDeadlineExceeded):
			c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
			return body, res.release, schemas.NewProblem(schemas.ProblemBodyTimeout,
				"the body was not received in time; send it faster or in smaller requests")
		}
		c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
		return body, res.release, schemas.NewProblem(schemas.ProblemMalformedBody, "reading the body failed: "+err.Error())
	}
	if int64(len(body)) > limit {
		return body, res.release, c.tooLarge()
	}
	return body, res.release, nil
}

// readAll appends what r holds to dst. It grows dst by doubling what it
// received (so memory follows the bytes that arrived), but not past size
// (the declared length, or -1), which a body of known length thus fills
// exactly instead of leaving up to half of a doubled buffer unused.
func readAll(dst []byte, r io.Reader, size int64) ([]byte, error) {
	for {
		if len(dst) == cap(dst) {
			n := max(len(dst), 64<<10)
			if left := size - int64(len(dst)); left >= 0 {
				n = int(min(int64(n), left+1)) // +1: room to see the end without growing again
			}
			dst = slices.Grow(dst, n)
		}
		n, err := r.Read(dst[len(dst):cap(dst)])
		dst = dst[:len(dst)+n]
		switch {
		case err == io.EOF:
			return dst, nil
		case err != nil:
			return dst, err
		}
	}
}

// discardBody sends p at once and then reads what is left of the body (at
// most limit bytes, within the server's read timeout) without keeping it. A
// client still sending a large body then gets the answer instead of a
// connection reset: net/http closes a connection with more than 256 KiB
// unread, and the client's pending write fails before it reads the answer.
// Full duplex, or net/http would first consume a smaller unread rest before
// writing the answer, so a shed request would wait for its client's last
// byte (or the read timeout). The connection is not reused: net/http does
// not support a full-duplex request whose body is left unread on a
// keep-alive connection (its next read races the body's).
func discardBody(w http.ResponseWriter, r *http.Request, p *schemas.Problem, limit int64) {
	rc := http.NewResponseController(w)
	rc.EnableFullDuplex()
	w.Header().Set("Connection", "close")
	p.Write(w)
	rc.Flush()
	io.Copy(io.Discard, io.LimitReader(r.Body, limit))
}

// overloaded answers a request whose body does not fit in the budget of
// body bytes in flight: retrying soon helps, as requests ahead finish.
func (c *Collector) overloaded(w http.ResponseWriter) *schemas.Problem {
	c.metrics.rejected.WithLabelValues(rejectOverloaded).Inc()
	w.Header().Set("Retry-After", strconv.Itoa(OverloadedRetryAfterSec))
	return schemas.NewProblem(schemas.ProblemOverloaded,
		fmt.Sprintf("the request bodies in flight hold the collector's bound of %d bytes; retry the same events after Retry-After",
			c.cfg.MaxInflightBodyBytes))
}

func (c *Collector) tooLarge() *schemas.Problem {
	c.metrics.rejected.WithLabelValues(rejectTooLarge).Inc()
	return schemas.NewProblem(schemas.ProblemBodyTooLarge,
		fmt.Sprintf("the body exceeds %d bytes; split the events over several requests", c.cfg.MaxBodyBytes))
}

func (c *Collector) decodeProblem(err error) *schemas.Problem {
	var syn *schemas.SyntaxError
	switch {
	case errors.Is(err, schemas.ErrUnsupportedMediaType):
		c.metrics.rejected.WithLabelValues(rejectMediaType).Inc()
		return schemas.NewProblem(schemas.ProblemUnsupportedMediaType,
			strings.TrimPrefix(err.Error(), "schemas: ")+"; send application/json, application/x-ndjson, "+
				"application/cloudevents+json, application/cloudevents-batch+json, or a binary-mode CloudEvent "+
				"(ce-* headers) with application/json data")
	case errors.As(err, &syn):
		c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
		return schemas.NewProblem(schemas.ProblemMalformedBody, syn.Msg)
	case errors.Is(err, schemas.ErrNoEvents):
		c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
		return schemas.NewProblem(schemas.ProblemNoEvents, "the body holds no events")
	default:
		c.metrics.rejected.WithLabelValues(rejectMalformed).Inc()
		return schemas.NewProblem(schemas.ProblemMalformedBody, err.Error())
	}
}

// admit applies the principal's tenant, validates every event, stamps the
// receive time and drops repeats of (tenant, id) within the request. Any
// invalid event rejects the whole request. An event keeps the members that
// decoded, so validation reports only the fields that are wrong; a field
// that failed to decode is reported once, by the decoder.
func (c *Collector) admit(principal auth.Principal, d schemas.Decoded) ([]schemas.Event, int, *schemas.Problem) {
	now := c.cfg.Now().UTC()
	window := schemas.Window{Now: now, MaxAge: c.cfg.MaxEventAge}
	errs := d.Errors
	decoded := d.Errors // in the order of the events, which next walks
	next := 0
	checked := len(d.Events) // events validated: all, unless too many errors stop it
	for i := range d.Events {
		if len(errs)-len(decoded) >= schemas.MaxFieldErrors {
			checked = i
			break
		}
		e := &d.Events[i]
		if !principal.Admin {
			if e.Tenant == "" {
				e.Tenant = principal.Tenant
			} else if e.Tenant != principal.Tenant {
				c.metrics.rejected.WithLabelValues(rejectForbidden).Add(float64(len(d.Events)))
				return nil, 0, schemas.NewProblem(schemas.ProblemForbiddenTenant,
					fmt.Sprintf("event %d is for tenant %q but the API key belongs to tenant %q", i, e.Tenant, principal.Tenant))
			}
		}
		// The fields of event i that failed to decode.
		first := next
		for next < len(decoded) && decoded[next].Index == i {
			next++
		}
		bad := decoded[first:next]
		failed := func(field string) bool {
			return slices.ContainsFunc(bad, func(fe schemas.FieldError) bool { return fe.Field == field })
		}
		if failed("") {
			continue // not an object: nothing more to say about it
		}
		n := len(errs)
		errs = e.Validate(i, window, errs)
		// A field that failed to decode is reported once, by the decoder.
		errs = append(errs[:n], slices.DeleteFunc(errs[n:], func(fe schemas.FieldError) bool { return failed(fe.Field) })...)
		if e.Time.IsZero() {
			e.Time = now
		}
	}
	if len(errs) > 0 {
		c.metrics.rejected.WithLabelValues(rejectInvalid).Add(float64(len(d.Events)))
		slices.SortStableFunc(errs, func(a, b schemas.FieldError) int { return a.Index - b.Index })
		if checked < len(d.Events) {
			// Decode errors of the events not checked are not counted.
			errs = slices.DeleteFunc(errs, func(fe schemas.FieldError) bool { return fe.Index >= checked })
		}
		detail := strconv.Itoa(countIndexes(errs)) + " of " + strconv.Itoa(len(d.Events)) + " events are invalid"
		if d.Cut || checked < len(d.Events) {
			detail = strconv.Itoa(countIndexes(errs)) + " of the first " + strconv.Itoa(checked) + " events are invalid (the rest was not checked)"
		}
		if len(errs) > schemas.MaxFieldErrors {
			errs = errs[:schemas.MaxFieldErrors]
			detail += "; the first " + strconv.Itoa(schemas.MaxFieldErrors) + " errors are listed"
		}
		p := schemas.NewProblem(schemas.ProblemInvalidEvents, detail+"; nothing of this request was accepted")
		p.Errors = errs
		return nil, 0, p
	}
	events := d.Events
	if len(events) < 2 {
		return events, 0, nil
	}
	type key struct{ tenant, id string }
	seen := make(map[key]struct{}, len(events))
	kept := events[:0]
	for _, e := range events {
		k := key{e.Tenant, e.ID}
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		kept = append(kept, e)
	}
	return kept, len(events) - len(kept), nil
}

func countIndexes(sorted []schemas.FieldError) int {
	n := 0
	for i, e := range sorted {
		if i == 0 || e.Index != sorted[i-1].Index {
			n++
		}
	}
	return n
}

// deliveryProblem answers a request whose events (that many, repeats
// included) could not be made durable, and counts them as rejected.
// An event too large for a batch and a full spool refuse the request before
// any of it is placed; only a failed spool write (503) can have kept some of
// it: the client retries the same events, and their ids make the retry count
// once.
func (c *Collector) deliveryProblem(w http.ResponseWriter, err error, events int) {
	var tooLarge *EventTooLargeError
	switch {
	case errors.As(err, &tooLarge):
		c.metrics.rejected.WithLabelValues(rejectTooLarge).Add(float64(events))
		schemas.NewProblem(schemas.ProblemEventTooLarge,
			tooLarge.Error()+"; make it smaller (nothing of this request was accepted)").Write(w)
	case errors.Is(err, ErrSpoolFull):
		c.metrics.rejected.WithLabelValues(rejectSpoolFull).Add(float64(events))
		w.Header().Set("Retry-After", strconv.Itoa(DefaultSpoolRetryAfterSec))
		schemas.NewProblem(schemas.ProblemSpoolFull,
			"NATS is unreachable and the local spool is full; retry the same events later").Write(w)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// The client is gone; its events are still delivered.
	default:
		c.metrics.rejected.WithLabelValues(rejectUnavailable).Add(float64(events))
		c.log.Error("events not made durable", "err", err)
		w.Header().Set("Retry-After", "1")
		schemas.NewProblem(schemas.ProblemUnavailable,
			"the events could not be made durable; retry the same events").Write(w)
	}
}
