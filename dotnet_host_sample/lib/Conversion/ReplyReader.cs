// Design notes
// - A reply becomes plain C# values in one pass over borrowed references:
//   dict -> Reply, list/tuple -> List<object>, str -> string, int -> long
//   (beyond 64 bits: double), float -> double, bool, None -> null. Anything
//   else becomes its str() text: no Python object ever reaches the caller,
//   so a caller has nothing to dispose and nothing is left to a finalizer.
// - The facade only returns JSON-able values; the fallback is for bugs.
// - Making a string is most of a read's cost on Mono (40-60 ns each, against
//   15 ns for the C API call that finds its bytes), and a status poll
//   repeats its strings: the keys, the status, the ids, the timestamps of the
//   work polled. So short strings are made once: a direct-mapped table keyed
//   by the str object's address, each hit checked against its bytes (an
//   address is reused by other strings once the first is freed).
// - Call with the GIL held (it also guards the table). `value` stays the caller's.
using System;
using System.Collections.Generic;

namespace EmbeddedWorker
{
    internal static unsafe class ReplyReader
    {
        sealed class Known
        {
            public readonly IntPtr Object;
            public readonly string Text;

            public Known(IntPtr value, string text)
            {
                Object = value;
                Text = text;
            }
        }

        const int KnownLength = 64;  // longer strings are made each time: rarely repeated, costly to compare
        static readonly Known[] known = new Known[1024];  // guarded by the GIL
        static readonly object BoxedTrue = true, BoxedFalse = false;

        public static object Read(IntPtr value, int depth = 0)
        {
            if (value == PythonApi.None) return null;
            if (value == PythonApi.True) return BoxedTrue;
            if (value == PythonApi.False) return BoxedFalse;
            var type = PythonApi.TypeOf(value);
            if (type == PythonApi.UnicodeType) return Text(value);
            if (type == PythonApi.LongType)
            {
                long number = PythonApi.AsLong(value);
                if (number == -1 && PythonApi.ErrorOccurred() != IntPtr.Zero)
                {
                    PythonApi.ClearError();
                    return PythonApi.LongAsDouble(value);
                }
                return number;
            }
            if (type == PythonApi.FloatType) return PythonApi.AsDouble(value);
            if (depth > 64) return null;
            if (type == PythonApi.DictType) return ReadDict(value, depth);
            if (type == PythonApi.ListType || type == PythonApi.TupleType)
            {
                bool list = type == PythonApi.ListType;
                long count = (long)(list ? PythonApi.ListSize(value) : PythonApi.TupleSize(value));
                var items = new List<object>((int)count);
                for (long i = 0; i < count; i++)
                    items.Add(Read(list ? PythonApi.ListItem(value, (IntPtr)i) : PythonApi.TupleItem(value, (IntPtr)i), depth + 1));
                return items;
            }
            var text = PythonApi.Str(value);  // a subclass or an object the protocol does not send
            if (text == IntPtr.Zero)
            {
                PythonApi.ClearError();
                return null;
            }
            var shown = PythonApi.ReadString(text);
            PythonApi.DecRef(text);
            return shown;
        }

        public static Reply ReadDict(IntPtr dict, int depth = 0)
        {
            var fields = new Dictionary<string, object>((int)PythonApi.DictSize(dict));
            IntPtr position = IntPtr.Zero, key, item;
            while (PythonApi.DictNext(dict, ref position, out key, out item) != 0)
            {
                var name = PythonApi.TypeOf(key) == PythonApi.UnicodeType ? Text(key) : Read(key, depth + 1) as string;
                if (name == null) name = Convert.ToString(Read(key, depth + 1), System.Globalization.CultureInfo.InvariantCulture);
                fields[name] = Read(item, depth + 1);
            }
            return new Reply(fields);
        }
    
        /// <summary>A str as a string, made once while the same object keeps the same text.</summary>
        static string Text(IntPtr value)
        {
            byte* bytes;
            int length;
            if (!PythonApi.Utf8Of(value, out bytes, out length)) return null;
            if (length > KnownLength) return PythonApi.Decode(bytes, length);
            int slot = (int)(((long)value >> 4) & (known.Length - 1));
            var hit = known[slot];
            if (hit != null && hit.Object == value && Same(hit.Text, bytes, length)) return hit.Text;
            var text = PythonApi.Decode(bytes, length);
            known[slot] = new Known(value, text);
            return text;
        }

        /// <summary>Equal only when `bytes` are ASCII and spell `text` (UTF-8 longer than its UTF-16 text is never equal).</summary>
        static bool Same(string text, byte* bytes, int length)
        {
            if (text.Length != length) return false;
            for (int i = 0; i < length; i++)
                if (text[i] != bytes[i]) return false;
            return true;
        }
    }
}
