// Design notes
// - A reply becomes plain C# values in one pass over borrowed references:
//   dict -> Reply, list/tuple -> List<object>, str -> string, int -> long
//   (beyond 64 bits: double), float -> double, bool, None -> null. Anything
//   else becomes its str() text: no Python object ever reaches the caller,
//   so a caller has nothing to dispose and nothing is left to a finalizer.
// - The facade only returns JSON-able values; the fallback is for bugs.
// - Call with the GIL held. `value` stays the caller's.
using System;
using System.Collections.Generic;

namespace EmbeddedWorker
{
    internal static class ReplyReader
    {
        public static object Read(IntPtr value, int depth = 0)
        {
            if (value == PythonApi.None) return null;
            if (value == PythonApi.True) return true;
            if (value == PythonApi.False) return false;
            var type = PythonApi.TypeOf(value);
            if (type == PythonApi.UnicodeType) return PythonApi.ReadString(value);
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
            var fields = new Dictionary<string, object>();
            IntPtr position = IntPtr.Zero, key, item;
            while (PythonApi.DictNext(dict, ref position, out key, out item) != 0)
            {
                var name = PythonApi.TypeOf(key) == PythonApi.UnicodeType ? PythonApi.ReadString(key) : Read(key, depth + 1) as string;
                if (name == null) name = Convert.ToString(Read(key, depth + 1), System.Globalization.CultureInfo.InvariantCulture);
                fields[name] = Read(item, depth + 1);
            }
            return new Reply(fields);
        }
    }
}
