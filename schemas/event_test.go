package schemas

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestValidateWindow(t *testing.T) {
	now := time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)
	const future = "is more than 5m in the future"
	late := func(bound string) string { return "is older than the late-event bound of " + bound }
	cases := []struct {
		name string
		time time.Time
		w    Window
		want string // the time error, "" for none
	}{
		{"now", now, Window{Now: now}, ""},
		{"5m ahead", now.Add(5 * time.Minute), Window{Now: now}, ""},
		{"5m and 1ns ahead", now.Add(5*time.Minute + 1), Window{Now: now}, future},
		{"a day ahead", now.Add(24 * time.Hour), Window{Now: now}, future},
		{"35 days old", now.Add(-35 * 24 * time.Hour), Window{Now: now}, ""},
		{"35 days and 1ns old", now.Add(-35*24*time.Hour - 1), Window{Now: now}, late("840h0m0s")},
		{"negative MaxAge is the default", now.Add(-35*24*time.Hour - 1), Window{Now: now, MaxAge: -time.Hour}, late("840h0m0s")},
		{"custom MaxAge: 1h old", now.Add(-time.Hour), Window{Now: now, MaxAge: time.Hour}, ""},
		{"custom MaxAge: 1h and 1ns old", now.Add(-time.Hour - 1), Window{Now: now, MaxAge: time.Hour}, late("1h0m0s")},
		{"custom MaxAge: 90 days", now.Add(-89 * 24 * time.Hour), Window{Now: now, MaxAge: 90 * 24 * time.Hour}, ""},
		{"custom MaxAge does not move the future bound", now.Add(6 * time.Minute), Window{Now: now, MaxAge: 90 * 24 * time.Hour}, future},
		{"Now in another zone", now.Add(5 * time.Minute), Window{Now: now.In(time.FixedZone("X", -8*3600))}, ""},
		{"no time is not checked", time.Time{}, Window{Now: now}, ""},
		{"zero Window checks no bound", now.Add(-10 * 365 * 24 * time.Hour), Window{}, ""},
		{"zero Window checks no future bound", now.Add(24 * time.Hour), Window{}, ""},
		{"year 0000 in UTC", time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC), Window{}, ""},
		{"before year 0000 in UTC", time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC).Add(-time.Hour), Window{}, "must lie in the years 0000 to 9999 in UTC"},
		{"after year 9999 in UTC", time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), Window{}, "must lie in the years 0000 to 9999 in UTC"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := Event{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 1, Time: tc.time}
			errs := e.Validate(7, tc.w, nil)
			var want []FieldError
			if tc.want != "" {
				want = []FieldError{{Index: 7, Field: "time", Message: tc.want}}
			}
			if !reflect.DeepEqual(errs, want) {
				t.Fatalf("errors %v, want %v", errs, want)
			}
		})
	}
}

// A time that an offset pushes out of the years 0000-9999 is refused, so that
// every event that validates can be encoded in a batch.
func TestValidateTimeOutsideEncodableYears(t *testing.T) {
	d, err := DecodeEvents(MediaJSON, []byte(`{"id":"a","tenant":"acme","meter":"m","time":"0000-01-01T00:00:00+01:00"}`))
	if err != nil || len(d.Errors) > 0 {
		t.Fatal(err, d.Errors)
	}
	errs := d.Events[0].Validate(0, Window{}, nil)
	if len(errs) != 1 || errs[0].Field != "time" {
		t.Fatalf("errors %v", errs)
	}
}

func TestValidateRules(t *testing.T) {
	ok := Event{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 0, Dimensions: map[string]string{"route": "/v1"}}
	cases := []struct {
		name   string
		edit   func(*Event)
		fields []string
	}{
		{"valid", func(*Event) {}, nil},
		{"everything missing", func(e *Event) { *e = Event{} }, []string{"id", "meter", "tenant"}},
		{"id of 128 runes", func(e *Event) { e.ID = strings.Repeat("é", 128) }, nil},
		{"id of 129 runes", func(e *Event) { e.ID = strings.Repeat("é", 129) }, []string{"id"}},
		{"bad tenant", func(e *Event) { e.Tenant = "ac me" }, []string{"tenant"}},
		{"bad meter", func(e *Event) { e.Meter = "Api" }, []string{"meter"}},
		{"negative value", func(e *Event) { e.Value = -1 }, []string{"value"}},
		{"17 dimensions", func(e *Event) {
			e.Dimensions = map[string]string{}
			for i := range 17 {
				e.Dimensions[string(rune('a'+i))] = "v"
			}
		}, []string{"dimensions"}},
		{"bad dimension key and long value", func(e *Event) {
			e.Dimensions = map[string]string{"9": "v", "ok": strings.Repeat("x", 257), "fine": strings.Repeat("é", 256)}
		}, []string{"dimensions.9", "dimensions.ok"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := ok
			tc.edit(&e)
			prior := []FieldError{{Index: 0, Field: "x", Message: "earlier"}}
			errs := e.Validate(3, Window{}, prior)
			if !reflect.DeepEqual(errs[0], prior[0]) {
				t.Fatalf("the errors passed in were lost: %v", errs)
			}
			var fields []string
			for _, fe := range errs[1:] {
				if fe.Index != 3 || fe.Message == "" {
					t.Errorf("error %+v", fe)
				}
				fields = append(fields, fe.Field)
			}
			slices.Sort(fields)
			if !slices.Equal(fields, tc.fields) {
				t.Fatalf("fields %v, want %v", fields, tc.fields)
			}
		})
	}
}

func TestFieldErrorString(t *testing.T) {
	fe := FieldError{Index: 12, Field: "dimensions.route", Message: "value must be at most 256 characters"}
	if got := fe.Error(); got != "event 12: dimensions.route: value must be at most 256 characters" {
		t.Fatal(got)
	}
}
