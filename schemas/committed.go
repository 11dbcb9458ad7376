package schemas

import (
	"encoding/json"
	"errors"
	"math"
	"strconv"
	"time"
)

// Committed is what the aggregator publishes on meterd.committed.<partition>
// (CommittedSubject) after a durable commit: usage newly counted in one hour.
// The enforcer counts it toward the tenant's current period.
type Committed struct {
	Tenant string    `json:"tenant"`
	Meter  string    `json:"meter"`
	Hour   time.Time `json:"hour"`
	Value  int64     `json:"value"`
	Events int64     `json:"events"`
	// SealedAt is when the oldest batch of the commit was sealed, on its
	// collector's clock. No event of the increment was accepted earlier
	// than SealedAt minus the collector's batch wait: freshness measured
	// from it (by the enforcer and the gates) misses at most that wait.
	SealedAt time.Time `json:"sealed_at,omitzero"`
}

// Increment is usage newly counted by a commit: the sum of values and number
// of events of Tenant's Meter in the UTC hour starting at Hour. Store totals
// reuse the type for period sums, with Hour set to the start of the period.
// It lives here, not in the aggregator, because the enforcer reads it too.
type Increment struct {
	Tenant, Meter string
	Hour          time.Time
	Value, Events int64
}

// AppendCommitted appends c to dst as the JSON document encoding/json
// writes for it (strings escaped as appendString escapes them, without
// HTML escapes, which encoding/json reads the same), without reflection: the
// aggregator publishes one per tenant, meter and hour of every commit. It
// fails, as encoding/json does, for a time outside the years 0 to 9999.
func AppendCommitted(dst []byte, c *Committed) ([]byte, error) {
	if !jsonYear(c.Hour) || !c.SealedAt.IsZero() && !jsonYear(c.SealedAt) {
		return dst, errors.New("schemas: committed increment: a time outside the years 0 to 9999")
	}
	dst = append(dst, `{"tenant":`...)
	dst = appendString(dst, c.Tenant)
	dst = append(dst, `,"meter":`...)
	dst = appendString(dst, c.Meter)
	dst = append(dst, `,"hour":"`...)
	dst = c.Hour.AppendFormat(dst, time.RFC3339Nano)
	dst = append(dst, `","value":`...)
	dst = strconv.AppendInt(dst, c.Value, 10)
	dst = append(dst, `,"events":`...)
	dst = strconv.AppendInt(dst, c.Events, 10)
	if !c.SealedAt.IsZero() {
		dst = append(dst, `,"sealed_at":"`...)
		dst = c.SealedAt.AppendFormat(dst, time.RFC3339Nano)
		dst = append(dst, '"')
	}
	return append(dst, '}'), nil
}

// jsonYear reports whether encoding/json can write t.
func jsonYear(t time.Time) bool { y := t.Year(); return y >= 0 && y <= 9999 }

// DecodeCommitted reads a committed increment: what json.Unmarshal reads
// into a zero Committed, with the same error. The form AppendCommitted
// writes (known members, plain integers, UTC times) is read without
// reflection; anything else is left to encoding/json.
func DecodeCommitted(data []byte) (Committed, error) {
	if c, ok := decodeCommitted(data); ok {
		return c, nil
	}
	var c Committed
	err := json.Unmarshal(data, &c)
	return c, err
}

// decodeCommitted reads data if it is in the form AppendCommitted writes; ok
// is false for anything else.
func decodeCommitted(data []byte) (c Committed, ok bool) {
	s := &scanner{data: data}
	if s.peek() != '{' {
		return c, false
	}
	s.pos++
	for first := true; ; first = false {
		key, more, err := s.nextMember(first)
		if err != nil {
			return c, false
		}
		if !more {
			return c, s.expectEnd() == nil
		}
		st, good := strOK, true
		switch string(key) {
		case "tenant":
			c.Tenant, st, err = s.stringValue(notInterned)
		case "meter":
			c.Meter, st, err = s.stringValue(notInterned)
		case "hour", "sealed_at":
			var raw []byte
			var t time.Time
			raw, st, err = s.stringBytes()
			if t, good = utcTime(raw); key[0] == 'h' {
				c.Hour = t
			} else {
				c.SealedAt = t
			}
		case "value", "events":
			var raw []byte
			var n int64
			raw, err = s.rawValue()
			if n, good = plainInt(raw); key[0] == 'v' {
				c.Value = n
			} else {
				c.Events = n
			}
		default:
			return c, false
		}
		if err != nil || st != strOK || !good {
			return c, false
		}
	}
}

// utcTime parses an RFC 3339 time in UTC written as AppendFormat writes it
// (a 'T', at most nine digits of fraction, a 'Z'), which encoding/json reads
// the same; ok is false for any other form.
func utcTime(raw []byte) (time.Time, bool) {
	n := len(raw)
	if n < 20 || n == 21 || n > 30 || raw[10] != 'T' || raw[n-1] != 'Z' || n > 20 && raw[19] != '.' {
		return time.Time{}, false
	}
	return parseTime(raw, nil)
}

// plainInt parses a non-negative integer of decimal digits (no sign,
// fraction or exponent, which encoding/json reads differently into an
// int64); ok is false for any other form or on overflow.
func plainInt(raw []byte) (int64, bool) {
	if len(raw) == 0 || len(raw) > 1 && raw[0] == '0' {
		return 0, false
	}
	var n int64
	for _, c := range raw {
		d := int64(c - '0')
		if c < '0' || c > '9' || n > (math.MaxInt64-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}
