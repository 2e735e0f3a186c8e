// Design notes
// - A reply becomes plain C# values in one pass over borrowed references:
//   dict -> Reply, list/tuple -> List<object>, str -> string, int -> long
//   (beyond 64 bits: double), float -> double, bool, None -> null. Anything
//   else becomes its str() text: no Python object ever reaches the caller,
//   so a caller has nothing to dispose and nothing is left to a finalizer.
// - The facade only returns JSON-able values; the fallback is for bugs.
// - Each C API call costs 10-50 ns, making a string 40-60 ns more, and a
//   status poll repeats most of its values: the keys, the status, the ids,
//   the timestamps (Python formats each once), small numbers. So str and
//   int objects that Python shares (a reference count above the reply's
//   own: interned keys, a record's fields, small ints) are kept in a
//   direct-mapped table keyed by the object's address, with the C# value
//   read from them. The table holds a reference to each: an object it names
//   cannot be freed, so its address cannot be reused, and str and int
//   objects never change, so a hit is answered with no call and no compare.
//   Values made afresh for one reply (a refcount of one) are read and not
//   kept, so they never push out the ones that repeat.
// - Call with the GIL held (it also guards the table). `value` stays the
//   caller's. Release drops the table's references before the interpreter ends.
using System;
using System.Collections.Generic;

namespace EmbeddedWorker
{
    internal static unsafe class ReplyReader
    {
        sealed class Known
        {
            public IntPtr Object;  // one reference owned by the table
            public object Value;
        }

        const int KnownLength = 64;  // longer strings are not kept: rarely repeated, and their memory stays held
        static readonly Known[] known = new Known[1024];  // guarded by the GIL
        static readonly object BoxedTrue = true, BoxedFalse = false;

        public static object Read(IntPtr value, int depth = 0)
        {
            if (value == PythonApi.None) return null;
            if (value == PythonApi.True) return BoxedTrue;
            if (value == PythonApi.False) return BoxedFalse;
            var type = PythonApi.TypeOf(value);
            if (type == PythonApi.UnicodeType || type == PythonApi.LongType)
            {
                int slot = (int)(((long)value >> 4) & (known.Length - 1));
                var hit = known[slot];
                if (hit != null && hit.Object == value) return hit.Value;
                return type == PythonApi.UnicodeType ? Text(value, slot) : Number(value, slot);
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
                var name = Read(key, depth + 1) as string;
                if (name == null) name = Convert.ToString(Read(key, depth + 1), System.Globalization.CultureInfo.InvariantCulture);
                fields[name] = Read(item, depth + 1);
            }
            return new Reply(fields);
        }
    
        /// <summary>A str as a string, kept when Python shares the object.</summary>
        static string Text(IntPtr value, int slot)
        {
            byte* bytes;
            int length;
            if (!PythonApi.Utf8Of(value, out bytes, out length)) return null;
            var text = PythonApi.Decode(bytes, length);
            if (length <= KnownLength) Keep(slot, value, text);
            return text;
        }

        /// <summary>An int as a long (beyond 64 bits: a double), kept when Python shares the object.</summary>
        static object Number(IntPtr value, int slot)
        {
            long number = PythonApi.AsLong(value);
            if (number == -1 && PythonApi.ErrorOccurred() != IntPtr.Zero)
            {
                PythonApi.ClearError();
                return PythonApi.LongAsDouble(value);
            }
            object boxed = number;
            Keep(slot, value, boxed);
            return boxed;
        }

        /// <summary>Remember `value` for the object at `slot`'s address, holding a reference to it, when more than
        /// the reply holds it; the object the slot named before is let go.</summary>
        static void Keep(int slot, IntPtr value, object read)
        {
            if ((long)*(IntPtr*)value <= 1) return;  // ob_refcnt: made for this reply alone
            PythonApi.IncRef(value);
            var entry = known[slot];
            if (entry == null) known[slot] = entry = new Known();
            else PythonApi.DecRef(entry.Object);
            entry.Object = value;
            entry.Value = read;
        }

        /// <summary>Let go of every kept object; with the GIL held, before the interpreter ends.</summary>
        public static void Release()
        {
            for (int i = 0; i < known.Length; i++)
            {
                if (known[i] == null) continue;
                PythonApi.DecRef(known[i].Object);
                known[i] = null;
            }
        }
    }
}
